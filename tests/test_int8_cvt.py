"""The PTX the int8 kernels run on CUDA to widen int8 without conversion instructions (kernels/int8_cvt.py), run
on the CPU by a small emulator of its four instructions: every int8 value, four to a word as Triton packs them,
comes out exact (fp16, biased fp16 and float32 bits). The interpreter cannot run inline PTX, so this is what
checks the strings the GPU executes."""

import re

import numpy as np
import pytest

pytest.importorskip("triton")
from batchgen.worker.engine.kernels import int8_cvt  # noqa: E402


def _prmt(a: int, b: int, selector: int) -> int:
    """prmt.b32 (default mode): byte i of the result is byte (selector's nibble i & 7) of b:a, sign-replicated
    where that nibble's top bit is set."""
    pool = a | (b << 32)
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (pool >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def _f16x2(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def run(asm: str, inputs: dict[int, int]) -> dict[str, int]:
    """Runs asm's instructions over 32-bit registers ($n operands from inputs); returns every register."""
    regs: dict[str, int] = {f"${n}": v for n, v in inputs.items()}

    def value(operand: str) -> int:
        return int(operand, 16) if operand.startswith("0x") else regs[operand]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op == "xor.b32":
            regs[dst] = value(src[0]) ^ value(src[1])
        elif op == "mov.b32":
            regs[dst] = value(src[0])
        elif op == "prmt.b32":
            regs[dst] = _prmt(value(src[0]), value(src[1]), value(src[2]))
        elif op == "sub.f16x2":
            diff = (_f16x2(value(src[0])) - _f16x2(value(src[1]))).astype(np.float16).view(np.uint16)
            regs[dst] = int(diff[0]) | (int(diff[1]) << 16)
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs


def _words() -> tuple[np.ndarray, list[int]]:
    """Every int8 value, four a word (element 0 in the low byte, as pack=4 hands them to the asm)."""
    values = np.arange(-128, 128, dtype=np.int8)
    return values, [int(w) for w in values.view(np.uint8).reshape(-1, 4).copy().view("<u4").ravel()]


@pytest.mark.parametrize("biased", [False, True])
def test_the_fp16_permutes_give_every_int8_value_exactly(biased):
    asm = (int8_cvt._I8_TO_F16_BIASED if biased else int8_cvt._I8_TO_F16).value
    assert len(re.findall(r"\$\d", asm.replace("$2", ""))) >= 2  # two outputs, the packed input $2
    values, words = _words()
    got = []
    for word in words:
        regs = run(asm, {2: word})
        got.extend([*_f16x2(regs["$0"]), *_f16x2(regs["$1"])])  # elements 0, 1 then 2, 3
    want = values.astype(np.float16) + (np.float16(int8_cvt.INT8_BIAS) if biased else np.float16(0))
    assert np.array_equal(np.array(got, dtype=np.float16), want.astype(np.float16))


def test_the_float32_permutes_give_every_int8_value_exactly():
    values, words = _words()
    got = []
    for word in words:
        regs = run(int8_cvt._I8_TO_F32_BITS.value, {4: word})
        bits = np.array([regs[f"${i}"] for i in range(4)], dtype=np.uint32).view(np.float32)
        got.extend(bits - np.float32(8388736.0))  # the subtraction int8_to_f32 makes after the asm
    assert np.array_equal(np.array(got, dtype=np.float32), values.astype(np.float32))
