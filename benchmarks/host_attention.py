"""Decode attention on the host CPU vs streaming its K/V over PCIe: the small-VRAM mode's KV lever.

A 13B-shape decode step with 64 rows keeps ~9 GB of fp16 K/V at the workload's mean length; streamed to
the GPU that is ~0.17 s a step on top of the weights. Attending on the CPU where the cache lives sends
only q/k/v/o (a few MB) across the bus. Whether that wins depends on the host's memory bandwidth and its
kernels for each dtype, so this measures them: per layer, 64 rows × 40 heads × kv_len × 128, the cache a
view of a [rows, heads, max_len, head_dim] buffer as the engine keeps it.

    python3 -m benchmarks.host_attention            # prints a table, writes $OUT/host_attention.json
"""

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS, HEADS, HEAD_DIM, MAX_LEN = 64, 40, 128, 256


def _time(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def measure(dtype: torch.dtype, kv_len: int, kernel: str) -> dict:
    k = torch.randn(ROWS, HEADS, MAX_LEN, HEAD_DIM).to(dtype)
    v = torch.randn(ROWS, HEADS, MAX_LEN, HEAD_DIM).to(dtype)
    q = torch.randn(ROWS, HEADS, 1, HEAD_DIM).to(dtype)
    keys, values = k[:, :, :kv_len], v[:, :, :kv_len]
    scale = HEAD_DIM**-0.5
    if kernel == "sdpa":
        def run():
            return F.scaled_dot_product_attention(q, keys, values, scale=scale)
    else:
        def run():
            s = torch.matmul(q, keys.transpose(-1, -2)) * scale
            return torch.matmul(torch.softmax(s.float(), dim=-1).to(dtype), values)
    seconds = _time(run)
    nbytes = 2 * ROWS * HEADS * kv_len * HEAD_DIM * k.element_size()
    return {"dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "kv_len": kv_len,
            "ms_per_layer": round(1000 * seconds, 2), "gb_s": round(nbytes / seconds / 1e9, 1),
            "ms_per_step_40_layers": round(40 * 1000 * seconds, 1)}


def under_copies(dtype: torch.dtype, kv_len: int) -> dict | None:
    """The same read while pinned host→device copies run (the weight stream shares the host's memory)."""
    if not torch.cuda.is_available():
        return None
    import threading

    src = torch.empty(512 * 2**20, dtype=torch.int8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    stop, copied = threading.Event(), [0]

    def copy_loop():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            while not stop.is_set():
                dst.copy_(src, non_blocking=True)
                stream.synchronize()
                copied[0] += src.numel()

    thread = threading.Thread(target=copy_loop)
    start = time.perf_counter()
    thread.start()
    r = measure(dtype, kv_len, "sdpa")
    stop.set()
    thread.join()
    r["h2d_gb_s_meanwhile"] = round(copied[0] / (time.perf_counter() - start) / 1e9, 1)
    return r | {"under_copies": True}


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split() if f.startswith(("avx512", "amx", "avx2")))


def main() -> None:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for threads in sorted({torch.get_num_threads(), max(1, torch.get_num_threads() // 2), os.cpu_count()}):
        torch.set_num_threads(threads)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for kernel in ("sdpa", "matmul"):
                for kv_len in (178, 228):
                    r = measure(dtype, kv_len, kernel) | {"threads": threads}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    torch.set_num_threads(os.cpu_count())
    for dtype in (torch.float32, torch.bfloat16):
        r = under_copies(dtype, 178)
        if r:
            rows.append(r | {"threads": os.cpu_count()})
            print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": cpu_flags(),
              "torch": torch.__version__, "rows": rows}
    (out / "host_attention.json").write_text(json.dumps(result, indent=1))
    print("| threads | dtype | kernel | kv_len | ms/layer | GB/s | ms/step (40 layers) | H2D meanwhile |")
    for r in rows:
        print(f"| {r['threads']} | {r['dtype']} | {r['kernel']} | {r['kv_len']} | {r['ms_per_layer']} | {r['gb_s']} "
              f"| {r['ms_per_step_40_layers']} | {r.get('h2d_gb_s_meanwhile', '')} |")


if __name__ == "__main__":
    main()
