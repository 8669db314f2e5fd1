"""The `batchgen` command. Producer commands never import torch; worker commands load it lazily.
Exit codes and error reporting: producer/errors.py (also in README).
"""

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import IO, Any

import click
import redis
from batchgen.jobs import defaults
from batchgen.jobs.batch import Batch
from batchgen.jobs.openai_batch import status_object
from batchgen.jobs.states import BatchStatus
from batchgen.producer.errors import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Commands,
    emit,
    error_object,
    fail,
    handles_errors,
)
from batchgen.producer.worker_view import worker_view

redis_url_option = click.option("--redis-url", envvar="REDIS_URL", default=defaults.REDIS_URL, show_default=True,
                                 help="Redis to use (env REDIS_URL); rediss:// for TLS, user:password@ for ACL.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


class JsonLogFormatter(logging.Formatter):
    """`worker --json`: one JSON object a log line, so log shippers need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def client_for(redis_url: str):
    from batchgen.producer.client import BatchClient
    from batchgen.producer.config import ProducerConfig

    return BatchClient(ProducerConfig(redis_url=redis_url))


def describe(batch: Batch) -> str:
    c = batch.request_counts
    return (f"{batch.id}  {batch.status.value:<11} model={batch.model}  "
            f"{c['completed']}/{c['total']} completed, {c['failed']} failed, "
            f"{batch.input_tokens:,} in / {batch.output_tokens:,} out tokens")


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchgen")
def main() -> None:
    """Bulk LLM generation on your own GPU: submit JSONL batches to Redis, a resident 8-bit worker runs them."""


def shared_options(*options: Callable) -> Callable:
    """Options declared once and applied to every command that takes them (rq's style)."""

    def apply(fn: Callable) -> Callable:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


sampling_options = shared_options(
    click.option("--max-tokens", type=int, help="Default max_tokens for lines that set none."),
    click.option("--temperature", type=float, help="Default temperature (0 = greedy)."),
    click.option("--top-p", type=float, help="Default top_p."),
    click.option("--seed", type=int, help="Default seed."),
    click.option("--max-line-bytes", type=int, envvar="BATCHGEN_MAX_LINE_BYTES",
                 default=defaults.MAX_LINE_BYTES, show_default=True),
    click.option("--max-requests", type=int, envvar="BATCHGEN_MAX_REQUESTS",
                 default=defaults.MAX_REQUESTS_PER_BATCH, show_default=True),
    click.option("--max-tokens-limit", type=int, envvar="BATCHGEN_MAX_TOKENS_LIMIT",
                 default=defaults.MAX_TOKENS_LIMIT, show_default=True,
                 help="Largest max_tokens a line may ask for."),
)


def param_defaults(max_tokens, temperature, top_p, seed):
    from batchgen.jobs.inputs import ParamDefaults

    return ParamDefaults(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def report_invalid(result, as_json: bool) -> None:
    for err in result.errors[:50]:
        click.echo(f"error: {err}", err=True)
    if result.num_errors > 50:
        click.echo(f"... and {result.num_errors - 50} more invalid lines", err=True)
    if as_json:
        click.echo(json.dumps({**error_object("invalid_input", f"{result.num_errors} invalid line(s); nothing was enqueued"),
                               "errors": [vars(e) for e in result.errors], "num_errors": result.num_errors}))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", help="Model to run (a worker's served name); default: body.model of the lines.")
@sampling_options
@click.option("--priority", type=click.Choice(defaults.PRIORITIES), default="default", show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False), help="Workers also append results here.")
@click.option("--skip-invalid", is_flag=True, help="Enqueue the valid lines; invalid ones go to the error output.")
@click.option("--chunk-size", type=int, envvar="BATCHGEN_CHUNK_SIZE", default=defaults.CHUNK_SIZE,
              show_default=True, help="Requests per RQ chunk job.")
@click.option("--completion-window", envvar=["BATCHGEN_COMPLETION_WINDOW", "BATCHGEN_COMPLETION_WINDOW_S"],
              default="24h", show_default=True,
              help="How long the batch may run (24h, 1h, 30m; bare numbers are seconds): it sets expires_at, and "
                   "requests unfinished then end as expired.")
@click.option("--metadata", multiple=True, help="key=value, stored on the batch.")
@click.option("--results-root", envvar="BATCHGEN_RESULTS_ROOT",
              help="Refuse an --output-dir outside this directory (default: the roots live workers advertise).")
@click.option("--results-ttl", help="How long Redis keeps the batch's results once it ends (2h, 720h; default: "
                                    "the store's, 7 days): OpenAI's output_expires_after.")
@redis_url_option
@json_option
@handles_errors
def submit(inputs, model, max_tokens, temperature, top_p, seed, max_line_bytes, max_requests, max_tokens_limit,
           priority, output_dir, skip_invalid, chunk_size, completion_window, metadata, results_root, results_ttl,
           redis_url, as_json):
    """Validate INPUTS (JSONL, text files, a directory of .txt, or -) and enqueue them as one batch."""
    from batchgen.jobs.openai_batch import parse_window
    from batchgen.producer.client import BatchClient
    from batchgen.producer.config import ProducerConfig
    from tqdm import tqdm

    cfg = ProducerConfig(redis_url=redis_url, max_line_bytes=max_line_bytes, max_requests=max_requests,
                         max_tokens_limit=max_tokens_limit, chunk_size=chunk_size,
                         completion_window_s=parse_window(completion_window))
    if bad := [m for m in metadata if "=" not in m]:
        raise click.BadParameter(f"{bad[0]!r} is not key=value", param_hint="'--metadata'")
    meta = dict(m.split("=", 1) for m in metadata)
    client = BatchClient(cfg)
    # a million-line batch takes a while to validate and store: show it going (on a terminal, not with --json)
    with tqdm(desc="validating", unit=" lines", disable=as_json or not sys.stderr.isatty(), leave=False) as bar:
        result = client.submit(
            inputs, model=model, params=param_defaults(max_tokens, temperature, top_p, seed), priority=priority,
            output_dir=output_dir, skip_invalid=skip_invalid, metadata=meta, on_line=lambda _line: bar.update(),
            results_root=results_root, result_ttl_s=parse_window(results_ttl, "--results-ttl") if results_ttl else 0,
        )
    if result.batch is None:
        report_invalid(result, as_json)
        click.echo(f"{result.num_errors} invalid line(s); nothing was enqueued", err=True)
        sys.exit(EXIT_INVALID)
    for err in result.errors[:20]:
        click.echo(f"skipped: {err}", err=True)
    emit(as_json, with_idle_warning(client, result.batch), result.batch.id)


@main.command()
@click.argument("batch_id")
@click.option("--outcome", "outcomes", multiple=True, type=click.Choice(["errored", "expired", "cancelled"]),
              help="Which requests to run again (repeatable; default: every one that did not succeed).")
@click.option("--priority", type=click.Choice(defaults.PRIORITIES), help="Default: the batch's own.")
@redis_url_option
@json_option
@handles_errors
def retry(batch_id, outcomes, priority, redis_url, as_json):
    """Run an ended batch's failed requests again, as a new batch (same custom_ids, model and output dir;
    metadata retry_of=BATCH_ID). Prints its id."""
    from batchgen.producer.client import RETRIED

    client = client_for(redis_url)
    result, num_unstored = client.retry(batch_id, outcomes or RETRIED, priority)
    if num_unstored:
        click.echo(f"skipped: {num_unstored} request(s) rejected at submit (or unreadable in Redis) have nothing "
                   "stored to run again", err=True)
    if result.batch is None:
        fail(as_json, "nothing_to_retry", f"batch {batch_id} has no {'/'.join(outcomes or RETRIED)} "
             "request to run again", EXIT_INVALID)
    emit(as_json, with_idle_warning(client, result.batch), result.batch.id)


def with_idle_warning(client, batch: Batch) -> dict[str, Any]:
    """The batch object; when no live worker serves its model, a warning on stderr and in the object."""
    data = status_object(batch)
    if (warning := client.idle_warning(batch)) is not None:
        click.echo(f"warning: {warning}", err=True)
        data["warning"] = warning
    return data


@main.command()
@click.argument("batch_id")
@redis_url_option
@json_option
@handles_errors
def status(batch_id, redis_url, as_json):
    """Show a batch's status and request counts."""
    client = client_for(redis_url)
    batch = client.get(batch_id)
    emit(as_json, with_idle_warning(client, batch), describe(batch))


@main.command()
@click.argument("batch_id")
@click.option("--timeout", "timeout_s", type=float, help="Give up after this many seconds (exit 5).")
@click.option("--poll", "poll_s", type=float, default=1.0, show_default=True)
@redis_url_option
@json_option
@handles_errors
def wait(batch_id, timeout_s, poll_s, redis_url, as_json):
    """Wait for a batch to end, with a progress bar; exit 0 only if it completed."""
    from batchgen.producer.progress import batch_rates, postfix
    from tqdm import tqdm

    client = client_for(redis_url)
    first = client.get(batch_id)
    warning = client.idle_warning(first)
    if warning is not None:
        click.echo(f"warning: {warning}", err=True)
    bar = tqdm(total=first.total, unit="req", disable=as_json or not sys.stderr.isatty(),
               file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {postfix}]")

    def on_poll(b: Batch) -> None:
        bar.update(b.num_done - bar.n)
        if not bar.disable:  # tok/s comes from the workers' heartbeats: one more read, only when it shows
            bar.set_postfix_str(postfix(b, batch_rates(b, client.workers(), time.time())))

    def on_unavailable(exc: Exception, retry_in_s: float) -> None:
        click.echo(f"warning: Redis unavailable ({exc}); retrying in {retry_in_s:.1f}s", err=True)

    batch = client.wait(batch_id, timeout_s=timeout_s, poll_s=poll_s, on_poll=on_poll, on_unavailable=on_unavailable)
    bar.close()
    emit(as_json, {**status_object(batch), **({"warning": warning} if warning and not batch.status.is_terminal else {})},
         describe(batch))
    if not batch.status.is_terminal:
        sys.exit(EXIT_TIMEOUT)
    sys.exit(EXIT_OK if batch.status == BatchStatus.COMPLETED else EXIT_FAILED)


def fail_unwritable(as_json: bool, exc: OSError, output: str) -> None:
    """Exit 2 for an output file that cannot be written (`results`, `run`), naming it and why."""
    fail(as_json, "unwritable_output", f"cannot write {exc.filename or output}: {exc.strerror or exc}", EXIT_USAGE)


def same_file(a: IO[str], path: str) -> bool:
    """Whether the open stream a writes to the file at path (the same path, or stdout redirected to it)."""
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.stat(path))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


@main.command()
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-", show_default=True)
@click.option("--errors", type=click.Path(dir_okay=False),
              help="Error lines go here (default: with the output); created even when empty.")
@click.option("--ordered", is_flag=True, help="In input order (default: completion order).")
@redis_url_option
@click.option("--json", "as_json", is_flag=True,
              help="The counts as JSON: on stdout with -o FILE, else on stderr (stdout holds the lines).")
@handles_errors
def results(batch_id, output, errors, ordered, redis_url, as_json):
    """Export a batch's output lines (OpenAI batch output format); partial results while it runs."""
    client = client_for(redis_url)
    client.get(batch_id)  # before any file opens: a mistyped id or Redis down leaves an earlier export whole
    try:
        with click.open_file(output, "w") as out:
            # the errors file is made even when no error line comes; one that is the output file shares its handle
            # (two handles on one file would overwrite each other's lines)
            same = errors is not None and same_file(out, errors)
            with nullcontext() if errors is None or same else click.open_file(errors, "w") as err:
                n_ok, n_err = client.export(batch_id, out, err, ordered=ordered)
    except OSError as exc:
        fail_unwritable(as_json, exc, output)
    name = "<stdout>" if output == "-" else output
    counts = {"batch_id": batch_id, "results": n_ok, "errors": n_err, "output": name}
    emit(as_json, counts, f"{n_ok} results, {n_err} errors", err=not as_json or name == "<stdout>")


@main.command()
@click.argument("batch_id")
@redis_url_option
@json_option
@handles_errors
def cancel(batch_id, redis_url, as_json):
    """Cancel a batch; results already written are kept."""
    batch = client_for(redis_url).cancel(batch_id)
    emit(as_json, status_object(batch), describe(batch))


@main.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@redis_url_option
@json_option
@handles_errors
def list_(limit, redis_url, as_json):
    """Recent batches, newest first."""
    batches = client_for(redis_url).recent(limit)
    emit(as_json, [status_object(b) for b in batches], "\n".join(describe(b) for b in batches) or "no batches")


@main.command()
@redis_url_option
@json_option
@handles_errors
def workers(redis_url, as_json):
    """Live workers: model, batch size, tok/s, VRAM, GPU temperature."""
    infos = [worker_view(w) for w in client_for(redis_url).workers()]
    lines = [
        f"{w['name']}  {w['state']:<8} model={w['model']} batch={w['batch_size']}/{w['max_batch_size']} "
        f"tok/s={w['tokens_per_s']} vram_used={(w['vram_used_bytes'] or 0) / 2**30:.1f}GiB "
        f"free={(w['vram_free_bytes'] or 0) / 2**30:.1f}GiB temp={w['gpu_temperature_c'] or '-'}C "
        f"done={w['requests_done']} device={w['device']} gpu={w.get('cuda_visible_devices') or '-'}"
        + (f" int8={w['int8_kernel']}" if w.get("int8_kernel") else "")
        + (f" outlier_columns={w['int8_outlier_columns']}" if w.get("int8_outlier_columns") else "")
        + (f" rotated={w['int8_rotated_inputs']}" if w.get("int8_rotated_inputs") else "")
        for w in infos
    ]
    emit(as_json, infos, "\n".join(lines) or "no live workers")


engine_options = shared_options(
    click.option("--model", required=True, envvar="BATCHGEN_MODEL", help="HF model id or local path."),
    click.option("--served-model-name", envvar="BATCHGEN_SERVED_MODEL_NAME",
                 help="Name batches use for this model (default: --model)."),
    click.option("--engine", type=click.Choice(["llm", "echo"]), envvar="BATCHGEN_ENGINE", default="llm",
                 show_default=True, help="echo: no model, answers with the prompt (tests, benchmarks)."),
    click.option("--task", type=click.Choice(["auto", "generate", "embed"]), envvar="BATCHGEN_TASK", default="auto",
                 show_default=True, help="generate text, or embed it (/v1/embeddings lines); auto: embed when the "
                 "model ships sentence-transformers' modules.json, is an encoder, or is a base model without an LM head."),
    click.option("--device", envvar="BATCHGEN_DEVICE", default="auto", show_default=True),
    click.option("--vram-reserve", envvar="BATCHGEN_VRAM_RESERVE", default="500MiB", show_default=True),
    click.option("--max-vram", envvar="BATCHGEN_MAX_VRAM", help="Hard VRAM cap, e.g. 6GiB."),
    click.option("--max-batch", type=int, envvar="BATCHGEN_MAX_BATCH", help="Cap on rows per step."),
    click.option("--max-model-len", type=int, envvar="BATCHGEN_MAX_MODEL_LEN"),
    click.option("--max-prefill-tokens", type=int, envvar="BATCHGEN_MAX_PREFILL_TOKENS",
                 help="Prompt tokens per packed prefill step (vLLM's --max-num-batched-tokens); default: "
                      "max(max_model_len, 8192) on CUDA (4096 on the generic path), max_model_len on CPU. Larger: fewer, longer prefill steps."),
    click.option("--no-8bit", is_flag=True, help="Load in the compute dtype instead of bnb int8."),
    click.option("--int8-threshold", type=float, envvar="BATCHGEN_INT8_THRESHOLD", default=6.0,
                 show_default=True),
    click.option("--fp16-modules", envvar="BATCHGEN_FP16_MODULES", default="",
                 help="Comma-separated modules kept in the compute dtype instead of int8 (bnb's "
                      "llm_int8_skip_modules), e.g. model.layers.0,model.layers.31; the output head always is."),
    # Plain strings, not click.Choice: the choices live in the worker's EngineConfig, which validates them
    # (the producer CLI does not import the worker at load time).
    click.option("--int8-kernel", envvar="BATCHGEN_INT8_KERNEL", default="auto", show_default=True,
                 help="int8 matmul kernel: auto, int_mm_outliers, int_mm, weight_only or bnb (auto: int_mm_outliers where int_mm runs and the threshold is > 0)."),
    click.option("--int8-rotate", envvar="BATCHGEN_INT8_ROTATE", type=click.Choice(["auto", "none", "down"]),
                 default="auto", show_default=True,
                 help="down: each gated MLP's down projection rotates its input by block Hadamard matrices folded "
                      "into its int8 weights, a finer int8 scale on that heavy-tailed input (less drift from fp16 "
                      "than LLM.int8(); not in small-VRAM mode's fast path). none: LLM.int8()'s arithmetic. "
                      "auto: down wherever the int_mm_outliers kernel runs and the path allows it, else none."),
    click.option("--attention", envvar="BATCHGEN_ATTENTION", default="auto", show_default=True,
                 help="Attention kernel: auto, triton, flash or sdpa (auto on CUDA in fp16/bf16: flash prefill, Triton decode)."),
    click.option("--cuda-graphs/--no-cuda-graphs", envvar="BATCHGEN_CUDA_GRAPHS", default=True, show_default=True,
                 help="Replay decode steps as CUDA graphs (CUDA only)."),
    click.option("--overlap-decode/--no-overlap-decode", envvar="BATCHGEN_OVERLAP_DECODE", default=True,
                 show_default=True,
                 help="Fast path: queue the next decode step (its tokens picked on the device) before reading this "
                      "one's tokens, so the host's bookkeeping overlaps the GPU; rows with logprobs, logit_bias, "
                      "penalties, min_tokens or a grammar step synchronously."),
    click.option("--overlap-prefill/--no-overlap-prefill", envvar="BATCHGEN_OVERLAP_PREFILL", default=True,
                 show_default=True,
                 help="Fast path: launch the next prefill before reading this one's first tokens, so packing and "
                      "launching prompts overlaps the GPU across consecutive prefill steps; prompts with "
                      "logprobs, logit_bias, penalties, min_tokens or a grammar prefill synchronously."),
    click.option("--compact-rows/--no-compact-rows", envvar="BATCHGEN_COMPACT_ROWS", default=True,
                 show_default=True,
                 help="Fast path, paged KV: move running rows down into the rows finished requests freed (their "
                      "block-table rows only), so a decode step computes the running rows and not every row up "
                      "to the highest one still running."),
    click.option("--mixed-steps/--no-mixed-steps", envvar="BATCHGEN_MIXED_STEPS", default=False, show_default=True,
                 help="Fast path: decode the running rows in the same forward that prefills newly admitted prompts "
                      "(their projections share one weight read) instead of a prefill step, then a decode step."),
    click.option("--fused-elementwise/--no-fused-elementwise", envvar="BATCHGEN_FUSED_ELEMENTWISE", default=True,
                 show_default=True,
                 help="On CUDA: each RMSNorm (with the residual add before it), RoPE (a Triton kernel) and the gated MLP activation "
                      "of the fast path, and the tanh GELUs of generic-path models (BLOOM, GPT-2), run as one "
                      "compiled kernel instead of several."),
    click.option("--tuned-kernels/--no-tuned-kernels", envvar="BATCHGEN_TUNED_KERNELS", default=True,
                 show_default=True,
                 help="On CUDA: int8 GEMV and GEMM launches measured best on this GPU model (benchmarks.int8_tune's "
                      "table) where it holds the layer's shape; off: the default launches."),
    click.option("--host-kv-dtype", envvar="BATCHGEN_HOST_KV_DTYPE", default="auto", show_default=True,
                 help="Small-VRAM mode's host KV cache: auto (the compute dtype), float32, float16, bfloat16 "
                      "or int8 (about half the bytes, at int8 rounding)."),
    click.option("--kv-cache-dtype", envvar="BATCHGEN_KV_CACHE_DTYPE", default="auto", show_default=True,
                 help="The resident engine's and the generic path's KV cache (small-VRAM included): auto (int8 "
                      "where the resident fast path decodes with the Triton kernel on CUDA in float16, else the "
                      "compute dtype); compute (the compute dtype, exact); fp8 (e4m3 with calibrated per-head "
                      "scales: half the bytes, about twice the rows; not with --attention flash); fp8v (the "
                      "resident fast path only: V in e4m3, K exact, three quarters of the bytes); int8 (the "
                      "resident fast path only: K and V rounded per token and KV head, a float32 scale each, about "
                      "half the bytes, within the int8 weights' fidelity bounds)."),
    click.option("--kv-layout", envvar="BATCHGEN_KV_LAYOUT", default="paged", show_default=True,
                 help="The resident engine's KV cache layout: paged (64-token blocks; a row reserves what its "
                      "prompt + max_tokens reach, so more rows fit) or slots (every row holds max_model_len)."),
    click.option("--stream-kv/--no-stream-kv", envvar="BATCHGEN_STREAM_KV", default=False, show_default=True,
                 help="The generic path's small-VRAM mode: keep the rows' K/V in pinned host memory and stream each "
                      "layer's in with its weights (rows bounded by host memory, not the card; experimental)."),
    click.option("--warm-up/--no-warm-up", envvar="BATCHGEN_WARM_UP", default=True, show_default=True,
                 help="On CUDA: before the first job, run prompts of the calibration text through the engine's "
                      "steps once, so the first job does not pay the kernels' first-run compiles."),
    click.option("--int8-kv-scales", envvar="BATCHGEN_INT8_KV_SCALES",
                 type=click.Choice(["auto", "v", "p", "v32", "p32", "v-early", "p-early", "v-bias", "p-bias", "v-q8",
                                    "v-q8-early", "v-q16", "v-q16-early", "v-q16-keys", "v-q16-keys-vt"]),
                 default="auto",
                 hidden=True,
                 help="Benchmarks: with --kv-cache-dtype int8, the decode attention scales each V element (v) or the "
                      "softmax weights (p) in fp16, or the same through float32 (v32, p32), or in fp16 with each "
                      "tile converted where it is loaded (v-early, p-early), and left 1152 over its values, each "
                      "dot corrected after (v-bias, p-bias), or with q rounded to int8 against K on the int8 tensor "
                      "cores, V as v (v-q8; v-q16: q as two int8 terms; -early: V converted where it is loaded; "
                      "v-q16-keys: the keys on the tensor-core tiles' rows where each query head has "
                      "its own KV head, else as v-q16-early; v-q16-keys-vt: as v-q16-keys with a paged cache's V "
                      "transposed in each block, P·V on the int8 tensor cores). auto: the mode the GPU's tuned "
                      "table names, else v-q16-keys."),
    click.option("--compile-shapes", envvar="BATCHGEN_COMPILE_SHAPES", default="static-features", hidden=True,
                 help="Benchmarks: how the fused elementwise functions compile (static-features: only the "
                      "token/row dimensions symbolic; dynamic: every dimension)."),
    click.option("--inject-oom", envvar="BATCHGEN_INJECT_OOM", hidden=True,
                 help="Test hook: raise OOM in chosen forward calls (steps=…, p=…, seed=…)."),
)


def engine_config(kw: dict[str, Any]):
    from batchgen.jobs.config import parse_bytes
    from batchgen.worker.engine.config import EngineConfig

    return EngineConfig(
        model=kw["model"], served_model_name=kw["served_model_name"], task=kw["task"], device=kw["device"],
        load_in_8bit=not kw["no_8bit"], vram_reserve_bytes=parse_bytes(kw["vram_reserve"]),
        max_vram_bytes=parse_bytes(kw["max_vram"]) if kw["max_vram"] else None, max_batch_size=kw["max_batch"],
        max_model_len=kw["max_model_len"], max_prefill_tokens=kw["max_prefill_tokens"], int8_threshold=kw["int8_threshold"], int8_kernel=kw["int8_kernel"],
        int8_rotate=kw["int8_rotate"],
        attention=kw["attention"], cuda_graphs=kw["cuda_graphs"], overlap_decode=kw["overlap_decode"],
        overlap_prefill=kw["overlap_prefill"], compact_rows=kw["compact_rows"],
        mixed_steps=kw["mixed_steps"], fused_elementwise=kw["fused_elementwise"], tuned_kernels=kw["tuned_kernels"],
        compile_shapes=kw["compile_shapes"], warm_up=kw["warm_up"], int8_kv_scales=kw["int8_kv_scales"],
        host_kv_dtype=kw["host_kv_dtype"],
        kv_cache_dtype=kw["kv_cache_dtype"], kv_layout=kw["kv_layout"], stream_kv=kw["stream_kv"],
        inject_oom=kw["inject_oom"] or None,
        fp16_modules=tuple(name.strip() for name in kw["fp16_modules"].split(",") if name.strip()),
    )


@main.command()
@engine_options
@click.option("--queue", "priorities", multiple=True, type=click.Choice(defaults.PRIORITIES),
              help="Priorities to serve (default: all, high first).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option("--shutdown-grace", type=float, envvar="BATCHGEN_SHUTDOWN_GRACE", default=defaults.SHUTDOWN_GRACE_S,
              show_default=True, help="Seconds to finish in-flight requests on SIGTERM before requeueing.")
@click.option("--worker-ttl", type=int, envvar="BATCHGEN_WORKER_TTL", default=defaults.WORKER_TTL_S,
              show_default=True, help="Seconds without a heartbeat after which other workers requeue this one's chunks.")
@click.option("--heartbeat-interval", type=float, envvar="BATCHGEN_HEARTBEAT_INTERVAL",
              default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats (must be under half the worker TTL).")
@click.option("--echo-step-delay", type=float, envvar="BATCHGEN_ECHO_STEP_DELAY", default=0.0,
              help="echo engine: seconds each step takes (simulates GPU time; chaos tests).")
@click.option("--results-root", type=click.Path(file_okay=False), envvar="BATCHGEN_RESULTS_ROOT",
              help="Batches' --output-dir must lie inside it, else the batch fails (default: anywhere).")
@click.option("--name", help="Worker name (default: host.pid.random; with --gpus: NAME.gpuN).")
@click.option("--gpus", envvar="BATCHGEN_GPUS",
              help="One worker process per GPU, e.g. 0,1,2,3 (each gets CUDA_VISIBLE_DEVICES=N).")
@redis_url_option
@click.option("-v", "--verbose", is_flag=True)
@click.option("--json", "as_json", is_flag=True,
              help="Log lines as JSON objects (stderr) and a JSON summary on stdout at exit.")
@handles_errors
def worker(priorities, shutdown_grace, worker_ttl, heartbeat_interval, echo_step_delay, results_root, name, gpus,
           redis_url, burst, verbose, as_json, **kw):
    """Run a worker: load the model once (8-bit), then serve its queues until stopped."""
    from batchgen.jobs.redis_checks import refuse_evicting
    from batchgen.worker.config import WorkerConfig
    from batchgen.worker.factory import build_engine
    from batchgen.worker.worker import BatchWorker

    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    cfg = WorkerConfig(
        engine_config(kw), redis_url=redis_url, engine=kw["engine"], burst=burst,
        priorities=tuple(p for p in defaults.PRIORITIES if p in priorities) if priorities else defaults.PRIORITIES,
        worker_ttl_s=worker_ttl, heartbeat_interval_s=heartbeat_interval, shutdown_grace_s=shutdown_grace,
        echo_step_delay_s=echo_step_delay, results_root=results_root, **({"name": name} if name else {}),
    )
    if gpus:  # this process only supervises: see worker/launcher.py
        from batchgen.worker.launcher import command_line_args, launch

        worker_argv = [sys.executable, "-m", "batchgen.producer.cli", "worker", *command_line_args(click.get_current_context())]
        sys.exit(launch(gpus, worker_argv, name))
    conn = redis.Redis.from_url(cfg.redis_url, decode_responses=True, health_check_interval=30)
    refuse_evicting(conn)  # before the model loads: an evicting or unreachable Redis fails in a second
    engine = build_engine(cfg)
    done = BatchWorker(cfg, engine, conn).run()
    summary = {"name": cfg.name, "requests_done": done}  # one line, like the JSON log lines before it
    click.echo(json.dumps(summary) if as_json else f"{cfg.name}: {done} requests done")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), required=True,
              help="Output JSONL; '-' writes the lines to stdout (logs and progress stay on stderr; not with --json).")
@click.option("--errors", type=click.Path(dir_okay=False, allow_dash=True),
              help="Error lines (default: in the output; '-': stdout); created even when no line fails.")
@click.option("--ordered/--no-ordered", default=True, show_default=True,
              help="Write in input order, as vLLM's run-batch does; --no-ordered writes lines as they finish.")
@engine_options
@sampling_options
@click.option("--skip-invalid", is_flag=True)
@json_option
@handles_errors
def run(inputs, output, errors, ordered, skip_invalid, as_json, max_tokens, temperature, top_p, seed, max_line_bytes,
        max_requests, max_tokens_limit, **kw):
    """Run INPUTS in-process, no Redis (like `vllm run-batch`); same engine and output format."""
    from batchgen.jobs.inputs import InputLimits
    from batchgen.worker.config import WorkerConfig
    from batchgen.worker.local_run import (
        STDOUT,
        check_writable,
        read_local,
        results_stdout,
        run_local,
        terminate_as_exit,
    )

    to_stdout = STDOUT in (output, errors)
    if to_stdout and as_json:  # stdout holds either the result lines or the --json summary, never both
        fail(as_json, "usage", "-o - (or --errors -) writes the result lines to stdout, where --json writes its "
             "summary; drop --json or write the lines to a file", EXIT_USAGE)
    handler = logging.StreamHandler()  # stderr: the start-up block, the --model override note, engine lines
    handler.setFormatter(JsonLogFormatter() if as_json else logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    cfg = WorkerConfig(engine_config(kw), engine=kw["engine"])
    limits = InputLimits(max_requests=max_requests, max_line_bytes=max_line_bytes, max_tokens=max_tokens_limit)
    t0 = time.monotonic()
    # Validate before the model loads: a rejected file should cost seconds, not a model load.
    local = read_local(inputs, model=cfg.served_name, params=param_defaults(max_tokens, temperature, top_p, seed),
                       limits=limits)
    if local.invalid and not skip_invalid:
        for message in local.messages[:50]:
            click.echo(f"error: {message}", err=True)
        click.echo(f"{len(local.invalid)} invalid line(s); nothing was run", err=True)
        if as_json:
            click.echo(json.dumps({**error_object("invalid_input", f"{len(local.invalid)} invalid line(s)"),
                                   **local.summary(output)}))
        sys.exit(EXIT_INVALID)
    try:
        check_writable([output, errors])
    except OSError as exc:
        fail_unwritable(as_json, exc, output)
    from batchgen.worker.factory import build_engine
    from batchgen.worker.startup import log_startup

    with results_stdout() if to_stdout else nullcontext() as stdout, terminate_as_exit():
        engine = build_engine(cfg)
        log_startup(engine, cfg)
        summary = run_local(local, output, errors, engine, model=cfg.served_name, ordered=ordered,
                            progress=not as_json, stdout=stdout)
    summary["elapsed_s"] = round(time.monotonic() - t0, 3)
    shown = "stdout" if output == STDOUT else output
    emit(as_json, summary, f"{summary['succeeded']} succeeded, {summary['errored']} errored -> {shown}",
         err=to_stdout)


@main.command("demo-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@json_option
@handles_errors
def demo_model(out_dir, as_json):
    """Write a tiny RANDOMLY INITIALISED model + tokenizer to OUT_DIR (offline demo; output is gibberish)."""
    from batchgen.worker.demo_model import write_demo_model

    path = write_demo_model(out_dir)
    emit(as_json, {"path": str(path)}, f"wrote a random-weights demo model to {path}")


from batchgen.producer.serve.cli import serve  # noqa: E402 - click only; the web stack loads when it runs

main.add_command(serve)

if __name__ == "__main__":
    main()
