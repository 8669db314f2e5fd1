"""Decode attention on the host CPU: the small-VRAM mode's per-layer cost, per kernel and KV storage dtype.

A 13B-shape decode step with 64 rows reads the whole host KV cache once per layer (~0.47 GB in float32 at
the workload's mean length, 178 tokens), on the host cores, while the weight stream's DMA reads host
memory too. This measures one layer: torch's sdpa over a float32 cache (the old path) against the fused
kernel of worker/host_attention.py over float32 / float16 / bfloat16 / int8 storage, alone and while
pinned host→device copies run; then the engine's whole decode path per layer (host_kv.CpuAttention).

    python3 -m benchmarks.host_attention            # prints a table, writes $OUT/host_attention.json
"""

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from batchgen.worker.offload.host_attention import Kernel, native_kernel, quantize

ROWS, HEADS, HEAD_DIM, MAX_LEN, KV_LEN = int(os.environ.get("ROWS", 64)), 40, 128, 256, 178
LAYERS = 6  # distinct caches, visited in turn as a step does: the host's L3 (up to hundreds of MB) must not hold them


def decode_attention_late(q, keys, values, k_scale, v_scale, bias, scale):
    """host_attention.decode_attention with the softmax's division moved after the sum over V (once per output
    element instead of once per token): the variant "late"."""
    s = (q[:, :, :, None, :] * keys[:, :, None].float()).sum(-1)
    s = s * (k_scale[:, :, None] * scale) if k_scale is not None else s * scale
    s = s + bias[:, None, None]
    e = torch.exp(s - s.amax(-1, keepdim=True))
    w = e * v_scale[:, :, None] if v_scale is not None else e
    return (w[..., None] * values[:, :, None].float()).sum(-2) / e.sum(-1)[..., None]


def _time(fn, repeat: int = 12) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(repeat):
        fn(i % LAYERS)
    return (time.perf_counter() - start) / repeat


def case(name: str, kernels: dict):
    """(run(layer), bytes read per layer) in the layout each kernel wants, sliced to KV_LEN of MAX_LEN."""
    kind, dtype = name.split("-")
    q = torch.randn(ROWS, HEADS, 1, HEAD_DIM)
    bias = torch.zeros(ROWS, KV_LEN)
    scale = HEAD_DIM**-0.5
    caches = []
    for _ in range(LAYERS):
        k, v = torch.randn(ROWS, HEADS, MAX_LEN, HEAD_DIM), torch.randn(ROWS, HEADS, MAX_LEN, HEAD_DIM)
        ks = vs = None
        if dtype == "int8":
            (k, ks), (v, vs) = quantize(k), quantize(v)
            ks, vs = ks[:, :, :KV_LEN], vs[:, :, :KV_LEN]
        else:
            k, v = k.to(getattr(torch, dtype)), v.to(getattr(torch, dtype))
        v = v[:, :, :KV_LEN]
        caches.append((k[:, :, :KV_LEN], v, ks, vs))
    keys = caches[0][0]
    nbytes = 2 * keys.numel() * keys.element_size() + (0 if caches[0][2] is None else 2 * caches[0][2].numel() * 4)
    if kind == "sdpa":  # with the lengths' mask, as the engine would need it
        qd, mask = q.to(keys.dtype), bias[:, None, None, :].to(keys.dtype)
        return (lambda i: F.scaled_dot_product_attention(qd, caches[i][0], caches[i][1], mask, scale=scale)), nbytes
    if kind == "read":  # no math: what reading the same bytes costs this host
        return (lambda i: (caches[i][0].view(torch.int16).amax(), caches[i][1].view(torch.int16).amax())), nbytes
    if kind == "native":
        return (lambda i: native_kernel()(q, *caches[i], bias, scale)), nbytes
    return (lambda i: kernels[kind if kind in kernels else dtype](q, *caches[i], bias, scale)), nbytes


class Copies:
    """Pinned host→device copies queued on a side stream for about a second, like the weight stream (CUDA
    only): queued ahead, so they run whatever the timed kernel does with the GIL (a Python copy loop on a
    thread did not: it issued copies only between kernel calls). `outlasted` says they covered the timing."""

    SECONDS = 1.0

    def __enter__(self):
        self.src = torch.empty(256 * 2**20, dtype=torch.int8, pin_memory=True)
        self.dst = torch.empty_like(self.src, device="cuda")
        self.stream = torch.cuda.Stream()
        self.count = int(self.SECONDS * 60e9 / self.src.numel())
        with torch.cuda.stream(self.stream):
            self.begin = self.stream.record_event(torch.cuda.Event(enable_timing=True))
            for _ in range(self.count):
                self.dst.copy_(self.src, non_blocking=True)
            self.end = self.stream.record_event(torch.cuda.Event(enable_timing=True))
        return self

    def __exit__(self, *exc):
        self.outlasted = not self.end.query()
        self.end.synchronize()
        self.gb_s = self.count * self.src.numel() / (self.begin.elapsed_time(self.end) / 1e3) / 1e9


def host_info() -> dict:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        flags = model = ""
    numa = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    return {"cpu": model.split(":")[-1].strip() or platform.machine(), "cores": os.cpu_count(),
            "flags": sorted(f for f in flags.split() if f.startswith(("avx512", "amx", "avx2", "f16c"))),
            "numa": [line for line in numa.splitlines() if "NUMA" in line or "L3" in line],
            "cxx": shutil.which("g++") or shutil.which("c++"), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


# kind-dtype; "fused" is Kernel.build's (its softmax over every thread: cpp.min_chunk_size 1), "single" the same
# kernel compiled with inductor's default chunk size (the softmax's max/exp passes on one thread, `omp single`:
# the engine's kernel until 2026-11-25), "late" decode_attention_late compiled as Kernel.build does, "read" only
# reads the cache. VARIANTS=... picks some.
VARIANTS = tuple(os.environ.get("VARIANTS", "read-bfloat16,sdpa-float32,sdpa-bfloat16,fused-float32,fused-float16,"
                                "single-bfloat16,late-bfloat16,fused-bfloat16,fused-int8").split(","))


def engine_step(kv_dtype: str, kernel: Kernel, layers: int = 40) -> dict:
    """One decode step of host_kv.CpuAttention as the engine runs it (device "cpu": no copies), 13B shape,
    64 rows at KV_LEN: where the host time goes per layer (writing the new K/V, the kernel)."""
    from batchgen.worker.offload.host_kv import CpuAttention

    dtype = getattr(torch, kv_dtype)
    att = CpuAttention(num_layers=layers, max_rows=ROWS, buffer_rows=ROWS, num_heads=HEADS, num_kv_heads=HEADS, max_model_len=MAX_LEN,
                       head_dim=HEAD_DIM, max_tokens=ROWS, scaling=HEAD_DIM**-0.5, dtype=torch.bfloat16,
                       device=torch.device("cpu"), kv_dtype=dtype, kernel=kernel)
    q = torch.randn(ROWS, HEADS, 1, HEAD_DIM, dtype=torch.bfloat16)
    for step in range(3):
        att.begin(list(range(ROWS)), [KV_LEN - 1] * ROWS, decode=True)
        if step == 1:
            att.reset_timing()
            start = time.perf_counter()
        for layer in range(layers):
            att.attend(layer, q, q, q)
        att.reset()
    total = time.perf_counter() - start
    ms = {k: round(1000 * v / 2 / layers, 2) for k, v in att.seconds.items()}
    return {"kernel": f"engine-{kv_dtype}", "ms_per_layer": round(1000 * total / 2 / layers, 2), "split_ms": ms,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def main() -> None:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    info = host_info()
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    kernels = {}
    for dtype in sorted({v.split("-")[1] for v in VARIANTS if v.startswith("fused")} | {"float16", "int8"}):
        start = time.perf_counter()
        kernels[dtype] = Kernel.build(getattr(torch, dtype), num_kv_heads=HEADS, group=1, head_dim=HEAD_DIM,
                                      native=False)
        info[f"compile_s_{dtype}"] = round(time.perf_counter() - start, 1)
    kernels["late"] = Kernel.build(torch.bfloat16, num_kv_heads=HEADS, group=1, head_dim=HEAD_DIM,
                                   fn=decode_attention_late)
    kernels["single"] = Kernel.build(torch.bfloat16, num_kv_heads=HEADS, group=1, head_dim=HEAD_DIM,
                                     min_chunk_size=None, native=False)
    info["compiled"] = all(k.compiled for k in kernels.values())
    print(json.dumps(info), flush=True)
    rows = []
    for name in VARIANTS:
        run, nbytes = case(name, kernels)
        huge = [line for line in _read("/proc/meminfo").splitlines() if line.startswith("AnonHugePages")]
        info.setdefault("anon_huge_pages_with_caches", huge[0].split(":")[1].strip() if huge else "")
        for under in [False, True] if torch.cuda.is_available() else [False]:
            r = {"threads": torch.get_num_threads(), "kernel": name, "under_copies": under}
            if under:
                with Copies() as c:
                    seconds = _time(run)
                r |= {"h2d_gb_s": round(c.gb_s, 1), "copies_outlasted": c.outlasted}
            else:
                seconds = _time(run)
            r |= {"ms_per_layer": round(1000 * seconds, 2), "gb_s": round(nbytes / seconds / 1e9, 1),
                  "ms_per_step_40_layers": round(40 * 1000 * seconds, 1)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        del run
    for kv_dtype in ("bfloat16", "int8"):  # with the kernel the engine builds (native where it builds)
        kernel = Kernel.build(getattr(torch, kv_dtype), num_kv_heads=HEADS, group=1, head_dim=HEAD_DIM)
        rows.append(engine_step(kv_dtype, kernel) | {"native": kernel.native})
        print(json.dumps(rows[-1]), flush=True)
    (out / "host_attention.json").write_text(json.dumps(info | {"rows": rows}, indent=1))
    print("| kernel-KV dtype | under copies | ms/layer | GB/s | ms/step (40 layers) | H2D meanwhile |")
    for r in rows:
        print(f"| {r['kernel']} | {r.get('under_copies', '')} | {r['ms_per_layer']} | {r.get('gb_s', r.get('split_ms'))} "
              f"| {r.get('ms_per_step_40_layers', '')} | {r.get('h2d_gb_s', '')} |")


if __name__ == "__main__":
    main()
