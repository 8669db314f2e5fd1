"""JSON mode throughput: the LLM engine in-process over the same requests three times, as plain text, under
response_format json_object, and under a json_schema (an object of three typed properties).

The model is a random Llama kept 8-bit (the 7B shape on CUDA, the tiny demo shape on CPU) with the demo
tokenizer: a byte-level BPE, so a grammar can spell any JSON, where the word-level tokenizer of the other
benchmarks has no "{" at all. It spells JSON about one character per token (the schema's object takes ~37), and
its vocabulary is a few hundred tokens, so the per-step bitmask is narrow: a real 128k vocabulary makes the mask
fill and apply costlier than measured here.

Requests: prompts of printable demo tokens (32-256, fixed seed), temperature 0.7, seed per request, EOS honoured
(a grammar ends a row when its JSON is complete; plain rows mostly run to max_tokens), and one logit_bias on
every variant that favours closing quotes and braces (--quote-bias, --brace-bias). Per variant: output tok/s over the wall
time, decode ms/step and mean rows (the engine's step stats), host ms/step (wall time outside the steps:
grammar accept_token, detokenising), the fractions of outputs that parse as strict JSON, are a non-empty
object, and (json_schema) validate against the schema, and ratios to plain.

    python3 -m benchmarks.json_mode --out $OUT                                  # on the device: 7B shape
    .venv/bin/python -m benchmarks.json_mode --model-shape tiny --num-requests 16 --max-tokens 48 --out DIR
"""

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import build_llama7b, workload, write_json

VARIANTS = ("plain", "json_object", "json_schema")
# The string is bounded by a pattern, not maxLength: xgrammar's maxLength rule admits raw control characters,
# which strict JSON parsers reject (mlc-ai/xgrammar#800).
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
# Random weights have no habit of closing a string or an object: without a nudge, json_object rows write "{}" or
# one string key until max_tokens. Every variant carries the same bias, so the grammar is the only difference.
QUOTE_BIAS, BRACE_BIAS = 5.0, 2.0
TEMPERATURE = 0.7
PROMPT_LEN = (32, 256)
WARMUP_REQUESTS, WARMUP_TOKENS = 8, 4
MODEL_ROOT = Path("/tmp/json-mode-bench")


def require_structured_libs() -> None:
    """xgrammar (the engine's grammar) and jsonschema (the validity check) may be missing on a device machine."""
    missing = []
    for name in ("xgrammar", "jsonschema"):
        try:
            __import__(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        sys.exit(f"json_mode benchmark: cannot import {', '.join(missing)}; pip install xgrammar jsonschema, or put "
                 "their wheels' folder on PYTHONPATH")


def build_model(shape: str, out: Path) -> dict:
    """A random Llama with the demo tokenizer, written once to out (reused when present)."""
    from batchgen.worker.demo_model import write_demo_model

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return {"build_s": 0.0, "cached": True}
    start = time.perf_counter()
    if shape == "tiny":
        write_demo_model(out, chat_template=False)
        return {"build_s": round(time.perf_counter() - start, 1), "cached": False}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_demo_model(out.parent / f"{out.name}-demo-tokenizer",
                                                               chat_template=False))
    return build_llama7b(out, vocab_size=len(tokenizer), write_tok=tokenizer.save_pretrained)


def prompts(tokenizer, num_requests: int) -> list[str]:
    """The workload's fixed-seed token ids folded onto the tokens that decode to printable ASCII: such text
    encodes back to about as many tokens (a lone byte of a multi-byte character comes back as three)."""
    ascii_ids = [i for i in range(len(tokenizer)) if (s := tokenizer.decode([i])).isascii() and s.isprintable()
                 and i not in tokenizer.all_special_ids]
    return [tokenizer.decode([ascii_ids[t % len(ascii_ids)] for t in r.prompt_ids])
            for r in workload(num_requests, prompt_len=PROMPT_LEN, max_tokens=(1, 1))]


def close_bias(tokenizer, quote: float, brace: float) -> tuple[tuple[int, float], ...]:
    """Biases on '"' and '}' as the (token id, bias) pairs of SamplingParams.logit_bias (a zero bias: none)."""
    pairs = []
    for text, bias in (('"', quote), ("}", brace)):
        if not bias:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not one token of this tokenizer: {ids}")
        pairs.append((ids[0], bias))
    return tuple(pairs)


def requests(variant: str, texts: list[str], max_tokens: int, bias: tuple[tuple[int, float], ...],
             tag: str = ""):
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.protocol import GenerationRequest

    fmt = {} if variant == "plain" else {"response_format": variant}
    if variant == "json_schema":
        fmt["json_schema"] = json.dumps(SCHEMA)
    return [GenerationRequest(f"{tag}{variant}-{i}", Request(custom_id=f"r{i}", prompt=text, params=SamplingParams(
        temperature=TEMPERATURE, seed=i, max_tokens=max_tokens, logit_bias=bias, **fmt))) for i, text in enumerate(texts)]


def drain(engine, reqs) -> dict:
    """Adds every request and steps until the engine is empty (tests/test_llm_engine.py's run)."""
    results = {r.key: r for r in engine.add(reqs)}
    while engine.num_unfinished:
        for r in engine.step():
            results[r.key] = r
    errors = [r.error for r in results.values() if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]}")
    return results


def json_checks(variant: str, texts: list[str]) -> dict:
    """Fractions of outputs that parse as JSON, that are a non-empty object, and (json_schema) that validate."""
    import jsonschema

    parsed, valid, non_empty = 0, 0, 0
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        parsed += 1
        non_empty += isinstance(value, dict) and bool(value)
        if variant == "json_schema":
            try:
                jsonschema.validate(value, SCHEMA)
                valid += 1
            except jsonschema.ValidationError:
                pass
    n = len(texts)
    out = {"parse_rate": round(parsed / n, 3), "non_empty_object_rate": round(non_empty / n, 3)}
    if variant == "json_schema":
        out["schema_valid_rate"] = round(valid / n, 3)
    return out


def step_counts(engine) -> dict:
    stats = engine.step_stats
    return {f.name: getattr(stats, f.name) for f in fields(stats)
            if isinstance(getattr(stats, f.name), int | float) and f.name != "last_log"}  # counters, not the phase dicts


def measure(engine, variant: str, texts: list[str], max_tokens: int, bias: tuple[tuple[int, float], ...],
            sync) -> dict:
    """One variant after its own warm-up (kernels, the grammar compiled once and cached), timed to the last token."""
    drain(engine, requests(variant, texts[:WARMUP_REQUESTS], WARMUP_TOKENS, bias, tag="warmup-"))
    before = step_counts(engine)
    sync()
    start = time.perf_counter()
    results = drain(engine, requests(variant, texts, max_tokens, bias))
    sync()
    wall_s = time.perf_counter() - start
    steps = {k: v - before[k] for k, v in step_counts(engine).items()}
    tokens = sum(r.completion_tokens for r in results.values())
    outputs = [r.text for r in results.values()]
    decode_steps = max(1, steps["num_decode_steps"])
    return {"wall_s": round(wall_s, 3), "completion_tokens": tokens, "tok_s": round(tokens / wall_s, 1),
            "mean_completion_tokens": round(tokens / len(results), 1),
            "stopped_rate": round(sum(r.finish_reason == "stop" for r in results.values()) / len(results), 3),
            "decode_ms_per_step": round(1000 * steps["decode_s"] / decode_steps, 3),
            "mean_rows": round(steps["num_decode_rows"] / decode_steps, 1),
            "num_decode_steps": steps["num_decode_steps"], "prefill_s": round(steps["prefill_s"], 3),
            "decode_s": round(steps["decode_s"], 3),
            # host work between steps (grammar accept_token, detokenising, scheduling) per step
            "host_ms_per_step": round(1000 * max(0.0, wall_s - steps["prefill_s"] - steps["decode_s"]) / max(
                1, steps["num_decode_steps"] + steps["num_prefill_steps"]), 3),
            **json_checks(variant, outputs), "samples": outputs[:3]}


def with_ratios(runs: dict) -> dict:
    plain = runs["plain"]
    for run in runs.values():
        run["tok_s_vs_plain"] = round(run["tok_s"] / plain["tok_s"], 3) if plain["tok_s"] else None
        run["decode_ms_vs_plain"] = (round(run["decode_ms_per_step"] / plain["decode_ms_per_step"], 3)
                                     if plain["decode_ms_per_step"] else None)
    return runs


def table(summary: dict) -> str:
    lines = [f"JSON mode, {summary['device']}, {summary['model_shape']}: {summary['num_requests']} requests x "
             f"{summary['max_tokens']} max tokens, temperature {TEMPERATURE}, rows {summary['max_rows']}", "",
             "| variant | tok/s | x plain | decode ms/step | x plain | mean rows | mean tokens | stopped | parse | valid |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["variants"].items():
        lines.append(f"| {name} | {r['tok_s']:,.1f} | {r['tok_s_vs_plain']} | {r['decode_ms_per_step']} | "
                     f"{r['decode_ms_vs_plain']} | {r['mean_rows']} | {r['mean_completion_tokens']} | {r['stopped_rate']} | "
                     f"{r['parse_rate']} | {r.get('schema_valid_rate', '–')} |")
    lines.append("stopped: ended by EOS (a constrained row may end only once its JSON is complete); the rest hit "
                 "max_tokens. Rows and output lengths differ per variant: compare decode ms/step at its mean rows.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model-shape", choices=("7b", "tiny"), help="default: 7b on CUDA, tiny on CPU")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--quote-bias", type=float, default=QUOTE_BIAS, help="logit_bias on '\"' (0: none)")
    parser.add_argument("--brace-bias", type=float, default=BRACE_BIAS, help="logit_bias on '}' (0: none)")
    parser.add_argument("--model-dir", type=Path, help=f"default: {MODEL_ROOT}/<shape> (built once, reused)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")), help="a folder")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    require_structured_libs()
    import torch
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine
    from transformers import AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.model_shape or ("7b" if device == "cuda" else "tiny")
    if shape == "7b" and device != "cuda":
        sys.exit("json_mode benchmark: the 7b shape is built on CUDA; use --model-shape tiny on CPU")
    model_dir = args.model_dir or MODEL_ROOT / shape
    build = build_model(shape, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = prompts(tokenizer, args.num_requests)
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
    start = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(model=str(model_dir), device=device,
                                                max_model_len=longest + args.max_tokens))
    load_s = time.perf_counter() - start
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bias = close_bias(tokenizer, args.quote_bias, args.brace_bias)
    # every prompt once, untimed: kernels, graphs and the allocator meet the workload's shapes before plain does
    drain(engine, requests("plain", texts, WARMUP_TOKENS, bias, tag="warmup-all-"))
    runs = with_ratios({v: measure(engine, v, texts, args.max_tokens, bias, sync) for v in VARIANTS})
    extra = engine.stats().extra
    summary = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "model_shape": shape,
               "date": datetime.now(UTC).strftime("%Y-%m-%d"), "torch": torch.__version__,
               "num_requests": args.num_requests, "max_tokens": args.max_tokens, "temperature": TEMPERATURE,
               "prompt_tokens_max": longest, "vocab_size": len(tokenizer), "schema": SCHEMA,
               "logit_bias": {'"': args.quote_bias, "}": args.brace_bias},
               "max_rows": engine.stats().max_batch_size, "int8_kernel": extra.get("int8_kernel"),
               "attention": extra.get("attention"), "cuda_graphs": extra.get("cuda_graphs"),
               "build": build, "load_s": round(load_s, 1), "variants": runs}
    write_json(args.out / "json_mode.json", summary)
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
