"""`batchgen run`: one batch in-process, no Redis, same engine and output lines as the queue path."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchgen.jobs.batch import Batch
from batchgen.jobs.inputs import (
    InputLimits,
    ModelResolver,
    ParamDefaults,
    invalid_output_line,
    read_inputs,
    validate_batch,
)
from batchgen.jobs.states import BatchStatus
from batchgen.worker.engine.protocol import Engine, GenerationRequest
from batchgen.worker.result_files import append_lines
from batchgen.worker.worker import InFlight, result_line
from tqdm import tqdm


def run_local(
    inputs: Sequence[str], output: str, errors: str | None, engine: Engine, *, model: str,
    params: ParamDefaults, limits: InputLimits, skip_invalid: bool, progress: bool = True,
) -> dict[str, Any]:
    """Validates everything first (nothing runs on bad input unless skip_invalid), then generates."""
    valid: list[GenerationRequest] = []
    invalid: list[dict[str, Any]] = []
    messages: list[str] = []
    for parsed in validate_batch(read_inputs(inputs, defaults=params, limits=limits), ModelResolver(model)):
        if parsed.error is not None:
            messages.append(f"{parsed.source}:{parsed.line}: {parsed.error.code}: {parsed.error.message}")
            invalid.append(invalid_output_line(parsed))
        else:
            valid.append(GenerationRequest(str(len(valid)), parsed.request))
    summary: dict[str, Any] = {"total": len(valid) + len(invalid), "invalid": len(invalid), "errors": messages,
                               "succeeded": 0, "errored": 0, "output": output}
    if invalid and not skip_invalid:
        return summary
    out_path, err_path = Path(output), Path(errors) if errors else Path(output)
    for p in {out_path, err_path}:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    append_lines(err_path, invalid)
    batch = Batch(id="local", status=BatchStatus.IN_PROGRESS, model=model)
    flights = {g.key: InFlight(batch, int(g.key), g.request, "local") for g in valid}
    pending = list(reversed(valid))
    bar = tqdm(total=len(valid), unit="req", disable=not progress)
    results = []
    while pending or engine.num_unfinished:
        take = max(engine.num_wanted, 0 if engine.num_unfinished else 1)
        batch_in = [pending.pop() for _ in range(min(take, len(pending)))]
        results = engine.add(batch_in) if batch_in else []
        if engine.num_unfinished:
            results += engine.step()
        lines = [result_line(flights[r.key], r) for r in results]
        append_lines(out_path, [ln for ln in lines if not ln["error"]])
        append_lines(err_path, [ln for ln in lines if ln["error"]])
        summary["succeeded"] += sum(1 for ln in lines if not ln["error"])
        summary["errored"] += sum(1 for ln in lines if ln["error"])
        bar.update(len(lines))
    bar.close()
    summary["errored"] += len(invalid)
    return summary
