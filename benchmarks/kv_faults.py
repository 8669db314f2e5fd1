"""Which engine step first leaves an int8 KV pool's blocks not as the store wrote them: profile_steps' scenarios
(one row decoding, aborted; many rows admitted and decoding; their abort) stepped one engine step at a time, and
after each step every live row's whole blocks checked. An int8 cache quantises each token's head on its own absmax,
so each (token, head) of a sound block holds a 127 or -127, or is a zero head (all zeros, scale 0: an all-zero
input, as layer 0's K and V of a sampled pad token, whose embedding is zeros), counted apart; a block sealed twice
(V^T) or written over by another row's token does not, nor does a store of non-finite values (zeros, scale NaN).
V^T (--int8-kv-scales v-q16-keys-vt) opened hundreds of int8 outlier columns in profile_steps' decode at 614 rows
where the keys kernel opened none (docs/benchmarks.md, "A step at the bulk state under MPS"); this names the step
and the pool where it starts, where the faults are and what they hold (docs/benchmarks.md, "V^T's K/V blocks
checked after every step").

    python3 -m benchmarks.kv_faults --out $OUT/kv_faults --engine-options int8_kv_scales=v-q16-keys-vt \
        --rows 614 --prompt 352 --max-model-len 416 --steps 40                    # on the device
"""

import argparse
import json
from pathlib import Path

from benchmarks.common import write_json

DIAGNOSED = 4  # faulty steps a phase locates (fault_sites), the first ones whose counts changed
DIGEST_CHUNK = 1 << 22  # weights summed at once (32 MiB as float64)
CHUNK = 256  # blocks read at once (Llama-7B's: 64 MiB of int8, twice over; the engine leaves ~500 MiB free)
SITE_CHUNK = CHUNK // 4  # fault_sites' blocks at once: widened to int16, and their nonzero() on top


def block_counts(cache, blocks, scales=None) -> tuple[int, int]:
    """(faults, zero heads) of an int8 pool's layer cache [blocks, tokens, kv_heads, head_dim] (any strides: V^T's
    view reads its whole blocks as values) at these block ids: a fault is a (token, head) whose largest |value| is
    not 127. A zero head is all zeros with a scale of 0, what the store makes of an all-zero input (Llama's pad token
    embeds as zeros: layer 0's K and V of a sampled pad token); with the layer's scales [blocks, kv_heads, tokens]
    given it is told apart from the faults, else it is one."""
    faults = zeros = 0
    for chunk in blocks.split(CHUNK):
        peak = cache[chunk].abs().amax(dim=-1)  # [blocks, tokens, kv_heads]
        bad = peak != 127
        if scales is not None:
            zero = (peak == 0) & (scales[chunk].transpose(1, 2) == 0)
            bad, zeros = bad & ~zero, zeros + zero.sum()
        faults = faults + bad.sum()  # summed on the device: one sync a layer, not one a chunk
    return int(faults), int(zeros)


def _owned_blocks(engine) -> list[tuple[int, object, int]]:
    """(block id, its row's sequence, the block's index in the row) of every whole block pool_faults checks."""
    page = engine.runner.k_cache.shape[2]
    return [(b, seq, i) for row, seq in engine.scheduler.running.items()
            for i, b in enumerate(engine.blocks.rows.get(row, [])[:max(0, seq.num_tokens - 2) // page])]


def fault_sites(engine, limit: int = 12) -> dict:
    """Where pool_faults' faults are and what they hold, for K and V: faults per layer, the peaks found by kind
    (0: the store wrote zeros, or nothing; 128: a -128, as a NaN's cast; 1-126: written over, or sealed twice) and
    the scales the store wrote beside them (NaN or inf: its input was not finite; 0: zeros in, or never written),
    and the first `limit` sites (layer, block, the request, the block's index in its row, the token's place in the
    block and the row, the token id there, head, peak, scale). Zero heads (block_counts) are among them: a pad
    token's layer 0."""
    import torch

    runner, owned = engine.runner, _owned_blocks(engine)
    page = runner.k_cache.shape[2]
    at = torch.tensor([o[0] for o in owned], dtype=torch.long, device=runner.k_cache.device)
    out = {}
    for name, cache, scales in (("k", runner.k_cache, runner.k_scale), ("v", runner.v_cache, runner.v_scale)):
        per_layer, peaks, kinds, sites = [], {}, {"nan": 0, "inf": 0, "zero": 0, "finite": 0}, []
        for layer in range(cache.shape[0]):
            count = 0
            for start in range(0, len(owned), SITE_CHUNK):
                chunk = at[start:start + SITE_CHUNK]
                peak = cache[layer][chunk].to(torch.int16).abs().amax(dim=-1)  # [blocks, tokens, kv_heads]
                bad = (peak != 127).nonzero()
                count += len(bad)
                if not len(bad):
                    continue
                found = peak[peak != 127]
                for kind, n in (("0", found == 0), ("128", found == 128), ("1-126", (found > 0) & (found < 127))):
                    peaks[kind] = peaks.get(kind, 0) + int(n.sum())
                scale = scales[layer][chunk[bad[:, 0]], bad[:, 2], bad[:, 1]].float()  # [blocks, heads, tokens]
                kinds["nan"] += int(scale.isnan().sum())
                kinds["inf"] += int(scale.isinf().sum())
                kinds["zero"] += int((scale == 0).sum())
                kinds["finite"] += int((scale.isfinite() & (scale != 0)).sum())
                for (i, t, h), sc in zip(bad[:limit - len(sites)].tolist(), scale.tolist(), strict=False):
                    block, seq, index = owned[start + i]
                    at_row = index * page + t
                    token = (seq.prompt_ids + seq.output_ids)[at_row] if at_row < seq.num_tokens else None
                    sites.append({"layer": layer, "block": block, "request": seq.key, "block_in_row": index,
                                  "token_in_block": t, "position": at_row, "token": token,
                                  "row_tokens": seq.num_tokens, "head": h, "peak": int(peak[i, t, h]), "scale": sc})
            per_layer.append(count)
        out[name] = {"per_layer": per_layer, "peaks": peaks, "scales": kinds, "sites": sites}
    return out


def pool_faults(engine) -> dict:
    """K and V faults and zero heads (block_counts) over every layer, in the whole blocks of the engine's running
    rows (a block counts once the row holds a token past it: the steps queued before the check have written it)."""
    import torch

    runner = engine.runner
    ids = [o[0] for o in _owned_blocks(engine)]
    if runner.k_cache.is_cuda:
        torch.cuda.synchronize()
    at = torch.tensor(ids, dtype=torch.long, device=runner.k_cache.device)
    out = {"blocks": len(ids)}
    for name, cache, scales in (("k", runner.k_cache, runner.k_scale), ("v", runner.v_cache, runner.v_scale)):
        counts = [block_counts(cache[layer], at, scales[layer]) for layer in range(cache.shape[0])]
        out[name], out[f"{name}_zero"] = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return out


def scale_peaks(engine) -> dict:
    """K's and V's largest finite scale per layer over every token the running rows hold in the cache (partial
    blocks too), the request and position holding it, and the layer's median: a token whose K or V is outsized yet
    finite is sound to block_counts (its peak is still a ±127), while the o_proj after attention (whose output is
    at most the largest |V|) can overflow fp16 for every later query that weighs it."""
    import torch

    runner = engine.runner
    page = runner.k_cache.shape[2]
    tokens = [(seq, block, p) for row, seq in engine.scheduler.running.items()
              for p in range(max(0, seq.num_tokens - 2)) for block in [engine.blocks.rows[row][p // page]]]
    if not tokens:
        return {}
    device = runner.k_cache.device
    blocks = torch.tensor([b for _, b, _ in tokens], dtype=torch.long, device=device)
    places = torch.tensor([p % page for _, _, p in tokens], dtype=torch.long, device=device)
    out = {}
    for name, scales in (("k", runner.k_scale), ("v", runner.v_scale)):
        per_layer = []
        for layer in range(scales.shape[0]):
            s = scales[layer][blocks, :, places].float().amax(dim=1)  # a token's largest head scale
            s = torch.where(s.isfinite(), s, 0.0)
            peak, at = s.max(dim=0)
            seq, _, position = tokens[int(at)]
            per_layer.append({"max": float(peak), "request": seq.key, "position": position,
                              "median": float(s.median())})
        out[name] = per_layer
    return out


def int8_state(engine) -> dict:
    """Non-finite values in what the int8 path keeps between steps (each outlier input's keep mask and seen maxima,
    each linear's dense rows of its outlier columns) and the columns held: a store of NaNs from a first prefill
    (under MPS) points at state poisoned earlier, at calibration or warm-up."""
    import torch
    from batchgen.worker.engine.int8_linear import Int8Linear

    inputs, out = {}, {"linears": 0, "dense_nonfinite": 0, "columns": 0, "keep_nonfinite": 0, "seen_nonfinite": 0}
    for module in engine.model.modules():
        if isinstance(module, Int8Linear):
            out["linears"] += 1
            dense = getattr(module, "dense", None)
            if isinstance(dense, torch.Tensor) and dense.is_floating_point():
                out["dense_nonfinite"] += int((~dense.isfinite()).sum())
            if module.outliers is not None:
                inputs[id(module.outliers)] = module.outliers
    for o in inputs.values():
        out["columns"] += len(o.columns)
        out["keep_nonfinite"] += int((~o.keep.isfinite()).sum())
        out["seen_nonfinite"] += int((~o.seen.isfinite()).sum())
    return out | {"inputs": len(inputs)}


def weights_digest(engine) -> dict:
    """The model's parameters and buffers summed (float64) and their non-finite values counted: equal in two
    engines built from the same checkpoint unless something wrote over the weights (a stray store lands in
    whatever the allocator put next to the K/V pools)."""
    import torch

    tensors = {id(t): t for t in [*engine.model.parameters(), *engine.model.buffers()]}
    device = next(iter(tensors.values())).device
    total, nonfinite = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.long,
                                                                                          device=device)
    for t in tensors.values():
        if not (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int32, torch.int64)):
            continue
        for part in t.detach().reshape(-1).split(DIGEST_CHUNK):  # small temporaries: the pools leave ~500 MiB
            part = part.to(total.device).double()
            nonfinite += (~part.isfinite()).sum()
            total += part.nan_to_num(0.0, 0.0, 0.0).sum()
    return {"tensors": len(tensors), "nonfinite": int(nonfinite), "sum": float(total)}


class PrefillTrace:
    """Each decoder layer's attention output and new residual stream, finite or not and their largest |value|, and
    the first token (in the forward's packed sequence) where the layer's input, its attention output and its new
    residual stream are not finite, for the forwards of more than one token (prefills) while active:
    llama.layer_output wrapped, read after the step. Each prefill attention call too (llama._prefill_attention's
    attend wrapped): the first non-finite token of the q, k and v it was given, and the first token of each that
    the call changed (it stores K/V and attends; a stray write of its store or seal into the q/k/v it was given,
    which the attention then reads, would show there and nowhere else)."""

    def __init__(self):
        self.records: list = []
        self.attention: list = []

    def __enter__(self) -> "PrefillTrace":
        from batchgen.worker.engine import llama

        self.llama, self.inner, self.inner_attention = llama, llama.layer_output, llama._prefill_attention

        def traced(layer, h, o, spec=None):
            if h.shape[1] == 1:  # a decode step's
                return self.inner(layer, h, o, spec)
            first_in = first_nonfinite_token(h, 1)  # before the call: its residual add may write h in place
            out = self.inner(layer, h, o, spec)
            self.records.append([o.abs().amax(), out.abs().amax(), first_in, first_nonfinite_token(o, 2),
                                 first_nonfinite_token(out, 1)])
            return out

        def traced_attention(*args, **kwargs):
            attend = self.inner_attention(*args, **kwargs)

            def checked(layer, q, k, v):
                given = [first_nonfinite_token(t, 2) for t in (q, k, v)]
                kept = [t.clone() for t in (q, k, v)]
                o = attend(layer, q, k, v)
                self.attention.append(given + [first_changed_token(a, t, 2) for a, t in zip(kept, (q, k, v),
                                                                                           strict=True)])
                return o
            return checked
        llama.layer_output, llama._prefill_attention = traced, traced_attention
        return self

    def __exit__(self, *exc) -> None:
        self.llama.layer_output, self.llama._prefill_attention = self.inner, self.inner_attention

    def summary(self) -> dict:
        """The first layer call whose attention output, then whose residual stream, is not finite; each call's
        largest |value|s and the first non-finite token of its input, attention output and residual stream; each
        prefill attention call's first non-finite and first changed token of q, k and v."""
        rows = [{"peaks": [round(float(o), 2), round(float(out), 2)],
                 "tokens": {name: None if t < 0 else int(t) for name, t in zip(("input", "attention", "residual"),
                                                                               firsts, strict=True)}}
                for o, out, *firsts in self.records]
        first = {name: next((i for i, r in enumerate(rows) if r["tokens"][name] is not None), None)
                 for name in ("attention", "residual")}
        names = [f"{t}_{what}" for what in ("nonfinite", "changed") for t in "qkv"]
        attention = [{name: None if t < 0 else int(t) for name, t in zip(names, call, strict=True)}
                     for call in self.attention]
        first_attention = {name: next(([i, c[name]] for i, c in enumerate(attention) if c[name] is not None), None)
                           for name in names}  # [call, token] of each's first
        return {"calls": len(rows), "first_nonfinite": first, "first_attention_input": first_attention,
                "peaks": [r["peaks"] for r in rows], "first_nonfinite_token": [r["tokens"] for r in rows],
                "attention_inputs": attention}


def first_token(bad, dim: int):
    """The first index along dim (the tokens) where bool tensor bad holds a True, -1 where none (a tensor on bad's
    device: read after the step)."""
    import torch

    bad = bad.movedim(dim, 0).flatten(1).any(1)
    index = torch.arange(bad.numel(), device=bad.device)
    return torch.where(bad, index, bad.numel()).min().where(bad.any(), -1)


def first_nonfinite_token(t, dim: int):
    """The first index along dim where tensor t holds a non-finite value, -1 where none (first_token)."""
    return first_token(~t.isfinite(), dim)


def first_changed_token(before, after, dim: int):
    """The first index along dim where after differs from before (a NaN left a NaN is unchanged), -1 where none."""
    return first_token((before != after) & ~(before.isnan() & after.isnan()), dim)


def _diagnose(engine, step: int, counts: dict) -> dict:
    """A step's state, pool_faults' counts and fault_sites, printed short (three sites each)."""
    found = {"step": step, "num_ooms": engine._num_ooms, "running": len(engine.scheduler.running),
             "waiting": len(engine.scheduler.waiting), "free_blocks": engine.blocks.num_free,
             "counts": counts} | fault_sites(engine)
    print("faults", json.dumps(found | {c: found[c] | {"sites": found[c]["sites"][:3]} for c in "kv"}), flush=True)
    return found


def scenario(engine, vocab: int, *, rows: int, prompt: int, steps: int, max_model_len: int) -> dict:
    """profile_steps.scenarios' decode phases without the profiler, each step checked: each phase's first faulty
    step, its worst one and the first steps located (fault_sites); before them the int8 state and the weights at
    build, and the first step's prefill traced layer by layer (PrefillTrace) with the weights after it."""
    from benchmarks.profile_steps import _add, _prompts, _requests

    out = {}

    def phase(name: str, num_steps: int) -> None:
        first, worst, most, ran, diagnosed, last, zero = None, {"k": 0, "v": 0}, 0, 0, [], None, 0
        for step in range(num_steps):
            if not engine.num_unfinished:
                break
            engine.step()
            ran += 1
            now = pool_faults(engine)
            most = max(most, now["blocks"])
            zero = max(zero, now["k_zero"] + now["v_zero"])
            if now["k"] + now["v"] > worst["k"] + worst["v"]:
                worst = now | {"step": step}
            if any(now[c] for c in ("k", "v", "k_zero", "v_zero")) and len(diagnosed) < DIAGNOSED and now != last:
                diagnosed.append(_diagnose(engine, step, now))
            last = now
            if first is None and (now["k"] or now["v"]):
                first = step
        out[name] = {"steps": ran, "first_faulty_step": first, "worst": worst, "most_blocks_checked": most,
                     "most_zero_heads": zero, "rows": len(engine.scheduler.running),
                     "waiting": len(engine.scheduler.waiting), "diagnosed": diagnosed}
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "diagnosed"}), flush=True)

    single = min(128, max_model_len // 2)
    out["int8_state_built"], out["weights_built"] = int8_state(engine), weights_digest(engine)
    _add(engine, _requests(_prompts(1, single, vocab, 0), max_model_len - single, "s"))
    with PrefillTrace() as trace:  # the first prefill, layer by layer
        phase("first step", 1)
    out["first_prefill"], out["weights_after_first_step"] = trace.summary(), weights_digest(engine)
    out["scales_after_first_step"] = scale_peaks(engine)
    traced = out["first_prefill"]  # the firsts, then layers 0-3 (the JSON keeps every layer)
    print("first prefill", json.dumps({k: v[:4] if isinstance(v, list) else v for k, v in traced.items()}),
          "int8 state at build", json.dumps(out["int8_state_built"]), "weights at build",
          json.dumps(out["weights_built"]), "after the first step", json.dumps(out["weights_after_first_step"]),
          "scales, layers 0-3", json.dumps({c: v[:4] for c, v in out["scales_after_first_step"].items()}), flush=True)
    phase("single", 3 + steps)
    engine.abort(["s0"])
    _add(engine, _requests(_prompts(rows, prompt, vocab, 1), max_model_len - prompt, "d"))
    phase("decode", 10 * (max_model_len - prompt) + steps)  # admission, every row to its end, the refills
    engine.abort([f"d{i}" for i in range(rows)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=614)
    parser.add_argument("--prompt", type=int, default=352)
    parser.add_argument("--max-model-len", type=int, default=416)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--engine-options", default="", help="EngineConfig fields as key=value pairs")
    args = parser.parse_args()
    import torch
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from benchmarks import bulk
    from benchmarks.common import VOCAB_SIZE, build_llama7b
    from benchmarks.profile_steps import _options

    if not (bulk.MODEL_DIR / "config.json").exists():
        build_llama7b(bulk.MODEL_DIR)
    engine = build_llm_engine(EngineConfig(model=str(bulk.MODEL_DIR), device="cuda", max_model_len=args.max_model_len,
                                           **_options(args.engine_options)))
    report = {"engine_options": args.engine_options, "v_transposed": bool(getattr(engine.runner, "v_transposed", 0)),
              "engine": {"max_rows": engine.scheduler.max_rows, "num_blocks": engine.blocks.num_blocks,
                         "max_prefill_tokens": engine.scheduler.max_prefill_tokens,
                         "num_sms": torch.cuda.get_device_properties(0).multi_processor_count},
              **scenario(engine, VOCAB_SIZE, rows=args.rows, prompt=args.prompt, steps=args.steps,
                         max_model_len=args.max_model_len)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "kv_faults.json", report)


if __name__ == "__main__":
    main()
