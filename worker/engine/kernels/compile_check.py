"""Compiles every kernel to a cubin for a GPU architecture without a GPU (Triton's bundled ptxas), with the
constexpr choices the engine launches: a compile error shows here instead of on the first GPU run.

    python -m batchgen.worker.engine.kernels.compile_check [ARCH]     # default 90 (Hopper); prints JSON
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from batchgen.worker.engine.kernels import attention, int8_gemv, int8_keys, int8_ops, kv_store, rope
from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

EPILOGUE = {"Absmax": "*fp32", "Scb": "*fp32", "Bias": "*fp16", "Addend": "*fp16", "Out": "*fp16"}
# the GEMMs' epilogue also takes an outlier-aware linear's dense columns (activations, their columns, weight rows)
GEMM_EPILOGUE = {"Absmax": "*fp32", "Scb": "*fp32", "Bias": "*fp16", "Addend": "*fp16", "Residual": "*fp16",
                 "X": "*fp16", "Idx": "*i64", "Dense": "*fp16", "Out": "*fp16"}
# the persistent TMA kernel's: the pointer kernel's without the dense columns
TMA_EPILOGUE = {name: kind for name, kind in GEMM_EPILOGUE.items() if name not in ("X", "Idx", "Dense")}
GEMV_POINTERS = {"X": "*fp16", "W": "*i8", "Scb": "*fp32", "Bias": "*fp16", "Out": "*fp16", "Partial": "*fp32",
                 "Keep": "*fp16", "Seen": "*fp32", "Hits": "*fp32"}
SPLIT_INTS = ["stride_qn", "stride_qh", "stride_kr", "stride_kt", "stride_kh", "stride_vr", "stride_vt", "stride_vh",
              "stride_bt", "stride_mn", "stride_mh", "stride_ms", "stride_ln", "stride_lh", "stride_on", "stride_oh",
              "scale_stride", "stride_sr", "stride_sh"]

# the split kernel's strides that a launch over the engine's caches passes as multiples of 16 (Triton specialises
# them), so the loads compile as they run: vectorised, through cp.async
SPLIT_ALIGNED = ("stride_qn", "stride_qh", "stride_kr", "stride_kt", "stride_kh", "stride_vr", "stride_vt",
                 "stride_vh", "stride_bt", "stride_on", "stride_oh", "stride_sr", "stride_sh")


def build(kernel, arch: int, pointers: dict[str, str], ints: list[str], floats: list[str], constexprs: dict,
          aligned: tuple[str, ...] = (), **options):
    """aligned: the ints that are multiples of 16 (as a launch's are where Triton specialises them), besides the
    pointers (allocations are): without the hint the compiler cannot vectorise or pipeline those loads. An int a
    launch passes as 1 (Triton specialises it) goes in constexprs."""
    kinds = dict(pointers) | {n: "i32" for n in ints} | {n: "fp32" for n in floats}
    kinds |= {n: "constexpr" for n in constexprs}
    names = kernel.arg_names  # the signature in the kernel's order
    signature = {n: kinds[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*pointers, *aligned)}
    return triton_compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_report(ptx: str, arch: int) -> str:
    """What Triton's own ptxas says of a kernel with -v (registers, spills)."""
    ptxas = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        proc = subprocess.run([getattr(ptxas, "path", ptxas), "-v", f"--gpu-name=sm_{arch}a", str(source), "-o",
                               str(Path(tmp) / "kernel.o")], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def spill_bytes(ptx: str, arch: int) -> int | None:
    """The bytes of registers a kernel spills (stores to local memory); None where ptxas does not say."""
    found = re.search(r"(\d+) bytes spill stores", _ptxas_report(ptx, arch))
    return int(found.group(1)) if found else None


def programs_per_sm(ptx: str, arch: int, num_warps: int, shared_bytes: int) -> dict:
    """A thread's registers and the programs an SM holds at once (Hopper: 64k registers allocated 8 a thread at a
    time, 227 KB of shared memory with 1 KB reserved a program, 64 warps): the latency a decode kernel can hide."""
    found = re.search(r"Used (\d+) registers", _ptxas_report(ptx, arch))
    if not found:
        return {}
    registers = int(found.group(1))
    fit = min(65536 // (-(-registers // 8) * 8 * 32 * num_warps), (227 * 1024) // (shared_bytes + 1024),
              64 // num_warps)
    return {"registers": registers, "programs_per_sm": fit}


def build_split(arch: int, kv: str, constexprs: dict, **options):
    """attention._split_kernel compiled with kv ("*fp16", "*fp8e4nv" or "*i8") as its cache's pointer type, the
    strides a launch over the engine's caches passes as multiples of 16, the other pointers fp16/fp32/int32."""
    pointers = {"Q": "*fp16", "K": kv, "V": kv, "SeqLens": "*i32", "CacheRows": "*i32", "BlockTable": "*i32",
                "KScale": "*fp32", "VScale": "*fp32", "MidO": "*fp32", "MidLse": "*fp32", "Out": "*fp16"}
    constexprs = {"QK_INT8": 0, "INTERPRETED": False} | constexprs
    return build(attention._split_kernel, arch, pointers, SPLIT_INTS, ["qk_scale"], constexprs, aligned=SPLIT_ALIGNED,
                 **options)


def build_keys(arch: int, constexprs: dict, vt: bool = False, **options):
    """int8_keys._keys_kernel compiled as build_split compiles the split kernel (its arguments less the scale
    stride); vt: int8_keys._vt_kernel (V^T in each block: head_dim's stride in place of a token's, a multiple of
    16)."""
    pointers = {"Q": "*fp16", "K": "*i8", "V": "*i8", "SeqLens": "*i32", "CacheRows": "*i32", "BlockTable": "*i32",
                "KScale": "*fp32", "VScale": "*fp32", "MidO": "*fp32", "MidLse": "*fp32", "Out": "*fp16"}
    names = {"stride_vt": "stride_vd"} if vt else {}
    ints = [names.get(name, name) for name in SPLIT_INTS if name != "scale_stride"]
    if vt:  # each row reads its own cache row
        del pointers["CacheRows"]
    return build(int8_keys._vt_kernel if vt else int8_keys._keys_kernel, arch, pointers, ints, ["qk_scale"],
                 {"INTERPRETED": False} | constexprs, aligned=tuple(names.get(n, n) for n in SPLIT_ALIGNED), **options)


def loop_instructions(cubin: bytes, arch: int) -> int | None:
    """The SASS instructions of a kernel's main loop body, one warp's pass (nvdisasm beside Triton's ptxas): the
    longest loop with tensor-core MMAs and asynchronous copies (the pipelined one: a masked tail loop, as _vt_kernel's
    over a row's partial block, may be longer), else with MMAs, else the longest; None where nvdisasm is not there."""
    nvdisasm = Path(getattr(get_ptxas(arch), "path", get_ptxas(arch))).parent / "nvdisasm"
    if not nvdisasm.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "kernel.cubin"
        binary.write_bytes(cubin)
        lines = subprocess.run([str(nvdisasm), "-c", "-g", str(binary)], capture_output=True, text=True).stdout
    lines = lines.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    is_instruction = [bool(re.search(r"/\*[0-9a-f]{4,}\*/", line)) for line in lines]
    loops = []  # (has MMAs and copies, has MMAs, instructions)
    for i, line in enumerate(lines):  # a branch back to a label above it closes a loop
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if target and labels.get(target.group(1), i) < i:
            start = labels[target.group(1)]
            body = lines[start:i + 1]
            mma = any("MMA" in x for x in body)
            loops.append((mma and any("LDGSTS" in x for x in body), mma, sum(is_instruction[start:i + 1])))
    return max(loops, default=(False, False, 0))[2]


def instructions_per_kb(cubin: bytes, arch: int, num_warps: int, step_bytes: int) -> float | None:
    """Warp instructions per KB a loop step reads: loop_instructions times the program's warps, over its bytes, to set
    beside a measured bandwidth (docs/benchmarks.md: the int8 decode kernel's variants with a third fewer were no
    faster). None where nvdisasm is not there."""
    body = loop_instructions(cubin, arch)
    return round(body * num_warps / (step_bytes / 1024), 1) if body else None


def launch_stats(kernel, arch: int, num_warps: int, step_bytes: int) -> dict:
    """A compiled decode kernel's launch as its PTX and SASS tell it: shared memory, how deep the K/V copies are in
    flight (the largest count a cp.async.wait_group leaves; 0: each step waits for all of its loads), its 16-byte
    copies, int8 MMAs and byte permutes, warp instructions a KB a step reads, and the programs an SM holds."""
    ptx = kernel.asm["ptx"]
    return {"shared_bytes": kernel.metadata.shared,
            "loads_in_flight": max(map(int, re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)), default=0),
            "vector_loads": len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*0x10", ptx)),
            "int8_mma": len(re.findall(r"mma\.sync[^;]*\.s8", ptx)), "prmt": ptx.count("prmt.b32"),
            "warp_instructions_per_kb": instructions_per_kb(kernel.asm["cubin"], arch, num_warps, step_bytes),
            **programs_per_sm(ptx, arch, num_warps, kernel.metadata.shared)}


def seal_stats(ptx: str) -> dict:
    """A V^T seal's accesses: a block's head read in its tokens' runs and written as V^T's rows, 16 bytes at a time,
    with a barrier between (every read of the head done before a write over it)."""
    return {"vector_loads": len(re.findall(r"ld\.global[.a-z0-9]*\.v4", ptx)),
            "vector_stores": len(re.findall(r"st\.global[.a-z0-9]*\.v4", ptx)),
            "barriers": ptx.count("bar.sync") + ptx.count("barrier.sync")}


def compile_all(arch: int = 90) -> dict[str, dict]:
    out = {}
    for name, kv, paged, splits in (("split fp16", "*fp16", False, 2), ("split fp8", "*fp8e4nv", False, 2),
                                    ("split paged fp16", "*fp16", True, 2), ("split paged fp8", "*fp8e4nv", True, 2),
                                    ("one split paged fp16", "*fp16", True, 1),
                                    ("one split paged fp8", "*fp8e4nv", True, 1),
                                    ("split int8", "*i8", False, 2), ("one split paged int8", "*i8", True, 1),
                                    ("one split paged int8 scales in p", "*i8", True, 1),
                                    ("one split paged int8 f32", "*i8", True, 1),
                                    ("one split paged int8 f32 scales in p", "*i8", True, 1),
                                    ("one split paged int8 early", "*i8", True, 1)):
        k = build_split(arch, kv, dict(GROUP=4, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64,
                                       NUM_SPLITS=splits, HAS_ROWS=not paged, HAS_BLOCKS=paged, DOT_F32=False,
                                       TOKEN_SCALES=kv == "*i8", SCALES_IN_P=name.endswith("in p"),
                                       F16_INT8=kv == "*i8" and "f32" not in name, ASM_CVT=True,
                                       PAGE=32 if paged and kv == "*i8" else 64, CVT_EARLY=name.endswith("early"),
                                       PRELOAD=0, BIAS=False), num_warps=4, num_stages=2)
        out[name] = {"shared_bytes": k.metadata.shared}
        if kv == "*i8":  # fp16 from int8 by byte permutes, not conversion instructions (f32: the float32 path's)
            ptx = k.asm["ptx"]
            out[name] |= {"prmt": ptx.count("prmt.b32"), "cvt_from_s8": ptx.count(".s8"),
                          "byte_shared_loads": ptx.count("ld.shared.b8"), "ldmatrix": ptx.count("ldmatrix")}
    # the engine's launches over its paged cache (64-key blocks, 768 keys a row, one split), the split's block ids
    # read in the loop or ahead of it: how deep the compiler pipelines the K/V loads (the largest count a
    # cp.async.wait_group leaves in flight; 0: each step waits for all of its loads)
    fp16_3 = (attention.LAUNCH[0], attention.LAUNCH[1], 3)
    for name, kv, (block_n, warps, stages), early, preload, bias, q_terms in (  # q_terms: qk_int8
            ("paged int8 launch", "*i8", attention.INT8_LAUNCH, False, False, False, 0),
            ("paged int8 launch, ids ahead", "*i8", attention.INT8_LAUNCH, False, True, False, 0),
            ("paged int8 launch early, ids ahead", "*i8", attention.INT8_LAUNCH, True, True, False, 0),
            ("paged int8 launch biased, ids ahead", "*i8", attention.INT8_LAUNCH, True, True, True, 0),
            ("paged int8 launch q8, ids ahead", "*i8", attention.INT8_QK_LAUNCHES[1], False, True, False, 1),
            ("paged int8 launch q16 early, ids ahead", "*i8", attention.INT8_QK_LAUNCHES[2], True, True, False, 2),
            ("paged fp16 launch", "*fp16", attention.LAUNCH, False, False, False, 0),
            ("paged fp16 3 stages", "*fp16", fp16_3, False, False, False, 0),
            ("paged fp16 3 stages, ids ahead", "*fp16", fp16_3, False, True, False, 0)):
        page = attention.BLOCK_N
        k = build_split(arch, kv, dict(GROUP=4, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=block_n,
                                       NUM_SPLITS=1, HAS_ROWS=False, HAS_BLOCKS=True, DOT_F32=False,
                                       TOKEN_SCALES=kv == "*i8", SCALES_IN_P=False, F16_INT8=kv == "*i8",
                                       ASM_CVT=True, PAGE=page, CVT_EARLY=early,
                                       PRELOAD=attention.preload_pages(768, 1, block_n, page) * preload, BIAS=bias,
                                       QK_INT8=q_terms),
                        num_warps=warps, num_stages=stages)
        step_bytes = block_n * 128 * 2 * (1 if kv == "*i8" else 2)  # K and V an inner step reads
        out[name] = {"stages": stages} | launch_stats(k, arch, warps, step_bytes)
    # the keys on the tiles' rows (int8_keys) at its launch, over the same cache (Llama-2's heads: one a KV head)
    block_n, warps, stages = attention.KEYS_LAUNCH
    page = attention.BLOCK_N
    whole = max(page, block_n)  # a split starts on a block and a step
    k = build_keys(arch, dict(HEAD_DIM=128, BLOCK_N=block_n, NUM_SPLITS=1, HAS_ROWS=False, HAS_BLOCKS=True,
                              PAGE=page, WHOLE=whole, PRELOAD=attention.preload_pages(768, 1, whole, page), ASM=True),
                   num_warps=warps, num_stages=stages)
    out["paged int8 keys launch, ids ahead"] = launch_stats(k, arch, warps, block_n * 128 * 2) | {
        "spill_bytes": spill_bytes(k.asm["ptx"], arch), "lg2_approx": k.asm["ptx"].count("lg2.approx.f32")}
    # the same over V^T in each block (v-q16-keys-vt): P · V as int8 MMAs too, V^T's rows copied 16 bytes at a time
    k = build_keys(arch, dict(HEAD_DIM=128, BLOCK_N=block_n, NUM_SPLITS=1, PAGE=page, WHOLE=whole,
                              PRELOAD=attention.preload_pages(768, 1, whole, page), ASM=True),
                   vt=True, num_warps=warps, num_stages=stages)
    out["paged int8 keys launch, V transposed"] = launch_stats(k, arch, warps, block_n * 128 * 2) | {
        "spill_bytes": spill_bytes(k.asm["ptx"], arch)}
    k = build(attention._merge_kernel, arch, {"MidO": "*fp32", "MidLse": "*fp32", "Out": "*bf16"},
              ["stride_mn", "stride_mh", "stride_ms", "stride_ln", "stride_lh", "stride_on", "stride_oh"], [],
              dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=3, BLOCK_S=4), num_warps=4)
    out["merge"] = {"shared_bytes": k.metadata.shared}
    k = build(int8_ops._quantize_kernel, arch, {"X": "*fp16", "Xq": "*i8", "Absmax": "*fp32", "Outliers": "*fp16",
                                                "Argmax": "*i64", "Seen": "*fp32", "Hits": "*fp32"},
              ["stride_xm", "stride_qm", "K"], ["threshold"],
              dict(BLOCK_K=16384, HAS_OUTLIERS=True, KEEP=True, HAS_ARGMAX=False, GUARD=True, INTERPRETED=False),
              num_warps=16)
    ptx = k.asm["ptx"]  # torch.round's rounding; the guard's max and hit count as atomics
    out["quantize"] = {"round_half_even": "cvt.rni.f32.f32" in ptx, "guard_atomics": "atom.global" in ptx}
    for gemma in (False, True):  # the residual add, the norm and the quantiser (with the guard) in one kernel
        k = build(int8_ops._norm_quantize_kernel, arch,
                  {"H": "*fp16", "Delta": "*fp16", "HOut": "*fp16", "W": "*fp16", "X": "*fp16", "Xq": "*i8",
                   "Absmax": "*fp32", "Outliers": "*fp16", "Seen": "*fp32", "Hits": "*fp32"},
                  ["stride_hm", "stride_dm", "stride_om", "stride_xm", "stride_qm", "K"], ["eps", "threshold"],
                  dict(BLOCK_K=4096, ADD=True, GEMMA=gemma, STORE_X=True, HAS_OUTLIERS=True, GUARD=True,
                       INTERPRETED=False),
                  aligned=("stride_hm", "stride_dm", "stride_om", "stride_xm", "stride_qm"), num_warps=4)
        ptx = k.asm["ptx"]
        out[f"norm quantize{' gemma' if gemma else ''}"] = {
            "round_half_even": "cvt.rni.f32.f32" in ptx, "guard_atomics": "atom.global" in ptx,
            "rsqrt": "rsqrt" in ptx, "vectorised": "v4" in ptx, "spill_bytes": spill_bytes(ptx, arch)}
    for name, rotate in (("gated quantize", False), ("gated quantize rotated", True)):  # act · up, the rotation
        k = build(int8_ops._gated_quantize_kernel, arch,
                  {"GateUp": "*fp16", "X": "*fp16", "Xq": "*i8", "Absmax": "*fp32", "Outliers": "*fp16",
                   "Seen": "*fp32", "Hits": "*fp32"},
                  ["stride_gm", "stride_xm", "stride_qm", "K"], ["threshold"],
                  dict(TILE=int8_ops.GATED_TILE, ACT=0, ROTATE=rotate, HAS_OUTLIERS=True, GUARD=True,
                       INTERPRETED=False),
                  aligned=("stride_gm", "stride_xm", "stride_qm", "K"), num_warps=int8_ops.GATED_WARPS)
        ptx = k.asm["ptx"]  # the rotation's two dots on the tensor cores (tf32), no registers spilled
        out[name] = {"round_half_even": "cvt.rni.f32.f32" in ptx, "guard_atomics": "atom.global" in ptx,
                     "tf32_mma": ptx.count(".tf32.tf32"), "vectorised": "v4" in ptx,
                     "shared_bytes": k.metadata.shared, "spill_bytes": spill_bytes(ptx, arch)}
    k = build(int8_ops._dequantize_kernel, arch, {"Acc": "*i32"} | EPILOGUE,
              ["M", "N", "stride_cm", "stride_am", "stride_om"], ["inv_sq"],
              dict(BLOCK_M=8, BLOCK_N=512, HAS_BIAS=True, HAS_ADDEND=True), num_warps=4)
    out["dequantize"] = {"shared_bytes": k.metadata.shared}
    gemm_ints = ["stride_add", "stride_rm", "stride_xm", "stride_dn", "S", "stride_om", "stride_sm"]
    # dense: MAX_FUSED_SLOTS slots at the table's largest pointer launches (256 × 128 and 256 × 64 tiles): the
    # operand tiles reuse the shared memory the main loop's stages held; what the epilogue spills is reported
    # residual: the residual stream's add (gated_linear's down projection) in the largest launch's epilogue
    for name, dense, block_m, block_n, stages in (("int8 gemm", False, 128, 128, 4),
                                                  ("int8 gemm 256x128", False, 256, 128, 4),
                                                  ("int8 gemm 256x128 dense", True, 256, 128, 4),
                                                  ("int8 gemm 256x128 residual", False, 256, 128, 4),
                                                  ("int8 gemm 256x64", False, 256, 64, 5),
                                                  ("int8 gemm 256x64 dense", True, 256, 64, 5)):
        k = build(int8_ops._int8_mm_kernel, arch, {"A": "*i8", "B": "*i8"} | GEMM_EPILOGUE,
                  ["M", "N", "K", "stride_am_", "stride_bn", *gemm_ints], ["inv_sq"],
                  dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, EVEN_K=True, HAS_BIAS=True,
                       HAS_ADDEND=not dense, HAS_RESIDUAL=name.endswith("residual"), HAS_DENSE=dense, BLOCK_S=int8_ops.MAX_FUSED_SLOTS,
                       GROUP_K=0),
                  aligned=("N", "K", "stride_am_", "stride_bn", "stride_add", "stride_rm", "stride_xm", "stride_dn",
                           "stride_om"),
                  num_warps=8, num_stages=stages)
        ptx = k.asm["ptx"]
        out[name] = {"int8_tensor_cores": "s32.s8.s8" in ptx, "wgmma": "wgmma.mma_async" in ptx,
                     "pipelined": "cp.async" in ptx, "shared_bytes": k.metadata.shared,
                     "spill_bytes": spill_bytes(ptx, arch), "tile": [block_m, block_n], "threads": 8 * 32}
    k = build(int8_ops._int8_mm_tma_kernel, arch,
              {"ADesc": "tensordesc<i8[256, 128]>", "BDesc": "tensordesc<i8[128, 128]>"} | TMA_EPILOGUE,
              ["M", "N", "K", "stride_add", "stride_rm", "stride_om", "stride_sm"], ["inv_sq"],
              dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, NUM_SMS=132, HAS_BIAS=True, HAS_ADDEND=True,
                   HAS_RESIDUAL=True, GROUP_K=0),
              aligned=("N", "K", "stride_add", "stride_rm", "stride_om"), num_warps=8, num_stages=4)
    ptx = k.asm["ptx"]  # the operand tiles as bulk tensor copies into shared memory
    out["int8 gemm tma"] = {"tma": "cp.async.bulk.tensor" in ptx, "wgmma": "wgmma.mma_async" in ptx,
                            "shared_bytes": k.metadata.shared}
    for rows, block_m, block_n in ((1, 1, 16), (16, 16, 32)):  # one row's multiply-add path, and the dot path
        k = build(int8_gemv._gemv_kernel, arch, GEMV_POINTERS, ["M", "N", "K", "stride_xm", "stride_wn", "stride_om"],
                  ["inv_127", "threshold"],
                  dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=256, SPLIT_K=1, HAS_BIAS=False, DOT_F32=False,
                       GUARD=True, GUARD_BLOCK=1024, EVEN=True, BITS=True, PIPELINE=4, ASM_CVT=True),
                  aligned=("N", "K", "stride_xm", "stride_wn", "stride_om"), num_warps=4, num_stages=4)
        ptx = k.asm["ptx"]  # the dot path (16 rows) widens the weights to fp16 by byte permutes
        out[f"gemv {rows} row{'s' if rows > 1 else ''}"] = {
            "pipelined": "cp.async" in ptx, "shared_bytes": k.metadata.shared, "prmt": ptx.count("prmt.b32"),
            "byte_shared_loads": ptx.count("ld.shared.b8"),
            "warp_instructions_per_kb": instructions_per_kb(k.asm["cubin"], arch, 4, block_n * 256)
            if rows > 1 else None}  # one row's loop has no MMA to tell it from the guard's
    for name, dest, quant in (("kv store fp16", "*fp16", False), ("kv store fp8", "*u8", True),
                              ("kv store int8", "*i8", False)):
        k = build(kv_store._store_kernel, arch, {"Dest": dest, "Slots": "*i64", "Src": "*fp16", "Scale": "*fp32"},
                  ["stride_t", "stride_h", "scale_stride", "width", "stride_cb", "stride_ct", "stride_ch"], [],
                  dict(HEADS=32, HEAD_DIM=128, BLOCK_H=32, BLOCK_D=128, QUANT=quant, INT8=dest == "*i8",
                       INTERPRETED=False),
                  aligned=("stride_t", "stride_h", "stride_cb", "stride_ct", "stride_ch"), num_warps=4)
        ptx = k.asm["ptx"]
        out[name] = {"vectorised": "v4" in ptx}  # 16-byte loads (and stores)
        if quant or dest == "*i8":  # IEEE division (by the scale; 127 by the absmax), as torch's, not approximate
            out[name]["div_rn"] = "div.rn.f32" in ptx
    k = build(kv_store._seal_kernel, arch, {"Cache": "*i8", "Slots": "*i64"}, ["num_tokens", "stride_cb", "stride_ch"],
              [], dict(HEAD_DIM=128, PAGE=64, GROUP=kv_store.SEAL_GROUP), aligned=("stride_cb", "stride_ch"),
              num_warps=4)
    out["kv seal"] = seal_stats(k.asm["ptx"])
    k = build(rope._rope_kernel, arch, {"Q": "*fp16", "K": "*fp16", "Cos": "*fp16", "Sin": "*fp16", "QOut": "*fp16",
                                        "KOut": "*fp16"},
              ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_ct"], [],
              dict(Q_HEADS=32, K_HEADS=8, HALF=64, BLOCK_QH=32, BLOCK_KH=8, BLOCK_D=64),
              aligned=("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_ct"), num_warps=4)
    out["rope"] = {"vectorised": "v4" in k.asm["ptx"]}
    for name, cache, int8 in (("rope store", "*fp16", False), ("rope store int8", "*i8", True)):
        ints = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ct", "width",
                "stride_kb", "stride_ks", "stride_kc", "stride_vb", "stride_vs", "stride_vc"]
        k = build(rope._rope_store_kernel, arch, {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Cos": "*fp16",
                                                  "Sin": "*fp16", "QOut": "*fp16", "KCache": cache, "VCache": cache,
                                                  "Slots": "*i64", "KScale": "*fp32", "VScale": "*fp32"},
                  ints, [], dict(Q_HEADS=32, K_HEADS=8, HALF=64, BLOCK_QH=32, BLOCK_KH=8, BLOCK_D=64, INT8=int8,
                                 INTERPRETED=False),
                  aligned=tuple(i for i in ints if i != "width"), num_warps=4)
        out[name] = {"vectorised": "v4" in k.asm["ptx"]}  # q, the cache's k and v: 16-byte loads and stores
        if int8:  # 127 over each head's absmax by IEEE division, as the store's
            out[name]["div_rn"] = "div.rn.f32" in k.asm["ptx"]
    return out


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))
