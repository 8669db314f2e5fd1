"""The engine's two kernels for one query head a KV head over an int8 paged pool, timed side by side at the int8 bulk
state: int8_keys' keys kernel (V as stored, converted to fp16 for P·V) and its _vt_kernel (V transposed in each
block, P·V on the int8 tensor cores: --int8-kv-scales v-q16-keys-vt), on every SM and on green contexts of fewer
(96 of an H100's SMs have about an H200's bus each: docs/benchmarks.md, "V stored transposed").

    python3 -m benchmarks.vt_keys --sms 0 96 88 --out $OUT/vt_keys.json   # on the GPU (0: every SM)
    .venv/bin/python -m benchmarks.vt_keys --smoke                        # here: against the reference, interpreted
"""

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.kernels import shape_and_device

SMOKE = "--smoke" in sys.argv
shape_and_device(SMOKE)  # the interpreter is read when Triton first imports

KEYS_LAUNCHES = [None, (32, 1, 4)]  # None: KEYS_LAUNCH
VT_LAUNCHES = [None, (32, 1, 4), (32, 1, 5), (32, 2, 3), (64, 2, 3)]


def state(rows: int, heads: int, d: int, page: int, per_row: int, mean_ctx: int, device: str,
          q_scale: float = 1.0) -> dict:
    """Random int8 pools as model_runner.kv_pool lays them out (each block's heads outermost; V also transposed in
    each whole block and as written in each row's partial last one, the same values), scales, a shuffled block
    table, lengths (the first row one key, the last a key short of a block). q_scale: wider scores, so the running
    max moves (the smoke run)."""
    import torch
    from batchgen.worker.engine.kernels.attention import partial_blocks, v_written
    from batchgen.worker.engine.model_runner import kv_pool

    g = torch.Generator(device=device).manual_seed(0)
    blocks, max_len = rows * per_row, page * per_row
    lens = torch.randint(max(1, 2 * mean_ctx - max_len), max_len + 1, (rows,), generator=g, device=device,
                         dtype=torch.int32)
    lens[0], lens[-1] = 1, page - 1  # the last row's next token fills its block (store_times: a seal, always)
    shape = (1, blocks, page, heads, d)
    k, v, v_t = (kv_pool(shape, torch.int8, torch.device(device), True, transposed)[0]
                 for transposed in (False, False, True))
    k.copy_(torch.randint(-127, 128, k.shape, generator=g, device=device, dtype=torch.int8))
    v.copy_(torch.randint(-127, 128, v.shape, generator=g, device=device, dtype=torch.int8))
    table = torch.randperm(blocks, generator=g, device=device).view(rows, per_row).to(torch.int32)
    v_t.copy_(v)
    partial = partial_blocks(lens, table, page)  # as store_kv leaves them
    v_written(v_t)[partial] = v[partial]
    scales = [torch.rand(blocks, heads, page, generator=g, device=device) / 127 + 1e-4 for _ in range(2)]
    return dict(q=torch.randn(rows, heads, d, generator=g, device=device, dtype=torch.float16) * q_scale, k=k, v=v,
                v_t=v_t, ks=scales[0], vs=scales[1], lens=lens, table=table)


def engine_attention(s: dict, out, launch=None, vt: bool = False) -> None:
    """decode_attention over the state: int8_keys' kernel, or (vt) its _vt_kernel over V^T."""
    from batchgen.worker.engine.kernels import decode_attention

    tune = dict(block_n=launch[0], num_warps=launch[1], num_stages=launch[2]) if launch else {}
    decode_attention(s["q"], s["k"], s["v_t"] if vt else s["v"], s["lens"], s["q"].shape[2] ** -0.5, keys=True,
                     k_scale=s["ks"], v_scale=s["vs"], block_table=s["table"], out=out, **tune)


def name(vt: bool, launch) -> str:
    return f"engine {'V^T' if vt else 'keys'} kernel, " + ("KEYS_LAUNCH" if launch is None else " x ".join(map(str, launch)))


def smoke() -> dict:
    """Both kernels against the float32 reference at tiny shapes under the interpreter."""
    import torch
    from batchgen.worker.engine.kernels import decode_attention_reference

    s = state(rows=5, heads=2, d=64, page=64, per_row=4, mean_ctx=150, device="cpu", q_scale=4.0)
    ref = decode_attention_reference(s["q"], s["k"], s["v"], s["lens"], 64**-0.5, k_scale=s["ks"], v_scale=s["vs"],
                                     block_table=s["table"])
    out, res = torch.empty_like(s["q"]), {}
    for vt, launch in ((False, None), (True, None), (True, (64, 1, 3))):
        engine_attention(s, out, launch, vt)
        res[name(vt, launch)] = float((out.float() - ref.float()).abs().max())
    return {"max_abs_err": res, "ref_max": float(ref.abs().max()), "store": store_times(s, "cpu")}


def timed(args) -> dict:
    import torch

    from benchmarks.common import GreenSplit
    from benchmarks.kernels import time_ms

    s = state(rows=args.rows, heads=32, d=128, page=64, per_row=args.max_len // 64, mean_ctx=args.mean_ctx,
              device="cuda")
    needed = int(s["lens"].sum()) * 32 * (128 + 4) * 2  # int8 K and V and a float32 scale each, per token and head
    ref, out = torch.empty_like(s["q"]), torch.empty_like(s["q"])
    engine_attention(s, ref)
    res = {"device": torch.cuda.get_device_name(0), "rows": args.rows, "runs": []}
    variants = [(vt, launch) for vt, launches in ((False, KEYS_LAUNCHES), (True, VT_LAUNCHES)) for launch in launches]
    for sms in args.sms:
        stream = GreenSplit(sms).streams[0] if sms else torch.cuda.current_stream()
        run = {"sms": sms or torch.cuda.get_device_properties(0).multi_processor_count, "variants": {}}
        with torch.cuda.stream(stream):
            for vt, launch in variants:
                ms = time_ms(lambda vt=vt, launch=launch: engine_attention(s, out if vt else ref, launch, vt), "cuda")
                key = name(vt, launch)
                run["variants"][key] = {"ms": round(ms, 4), "kv_gb_s": round(needed / ms / 1e6, 1)} | (
                    {"max_abs_diff": float((out.float() - ref.float()).abs().max())} if vt else {})
                print(run["sms"], key, run["variants"][key], flush=True)
        res["runs"].append(run)
    res["store"] = store_times(s)
    return res


STORE_REPEATS = 20


def store_times(s: dict, device: str = "cuda") -> dict:
    """One decode step's V store for one layer (each row's next token, int8 with its scales, store_kv's kernel) into
    the pool as laid out and into V^T (a token's V written in a run; a block whose last place it fills turned into
    V^T: the runs, then the grouped seal, as a decode step through rope_store stores). ms a layer, timed over
    repeated stores of the same tokens, on the GPU STORE_REPEATS to a CUDA graph (the repeats turn those blocks over
    again, so the V^T pool's values are checked after the first store only: same). On the CPU store_kv's Triton
    kernel runs interpreted and the times mean nothing (the smoke run)."""
    import torch
    from batchgen.worker.engine.kernels.attention import v_values
    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv

    from benchmarks.kernels import graph_ms, time_ms

    page = s["v"].shape[1]
    rows = (s["lens"] < s["table"].shape[1] * page).nonzero()[:, 0]  # a full row takes no next token
    pos = s["lens"][rows].long()
    slots = cache_slots(s["v"], rows, pos, s["table"])
    x = torch.randn(pos.numel(), *s["v"].shape[2:], device=pos.device, dtype=torch.float16)
    def store(key: str) -> None:
        store_kv(s[key], slots, x, s["vs"], triton_kernel=True)

    for key in ("v", "v_t"):
        store(key)
    lens = s["lens"].clone()
    lens[rows] += 1
    # each row's tokens, its blocks side by side (a block's places past its row's length are never read)
    live = torch.arange(s["table"].shape[1] * page, device=pos.device)[None, :] < lens[:, None]
    held = [pool[s["table"].long()].flatten(1, 2)[live] for pool in (s["v"], v_values(s["v_t"], lens, s["table"]))]
    res = {"same": bool(torch.equal(*held))}
    for key in ("v", "v_t"):
        if device == "cuda":  # REPEATS stores in one graph: a lone store's launch outlasts its few microseconds
            ms = graph_ms(lambda key=key: [store(key) for _ in range(STORE_REPEATS)], device) / STORE_REPEATS
        else:
            ms = time_ms(lambda key=key: store(key), device)
        res[key] = round(ms, 4)
        print("store", key, res[key], "ms", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")) / "vt_keys.json")
    parser.add_argument("--rows", type=int, default=614)
    parser.add_argument("--mean-ctx", type=int, default=360)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--sms", type=int, nargs="+", default=[0, 96], help="0: every SM; else a green context")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()
    res = smoke() if args.smoke else timed(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res if args.smoke else {"wrote": str(args.out)}))


if __name__ == "__main__":
    main()
