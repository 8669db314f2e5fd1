"""int8 conversions inside Triton kernels. int8 -> fp16 without conversion instructions (the SMs convert int8 at
a quarter of their arithmetic rate): FasterTransformer's byte permutes, shared by the decode attention over an int8
cache and the small-row int8 GEMV. float32 -> int8 rounded half to even, as torch.round: the activation
quantisers' and the int8 K/V stores' (a head over its absmax)."""

from batchgen.worker.engine.kernels.backend import HAS_TRITON

INT8_BIAS = 1152.0  # what a biased conversion leaves over each value: 1024 (the 0x64 high byte) + 128 (the xor)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def round_half_even(x, INTERPRETED: tl.constexpr):
        """float32 x (|x| <= 127 where it is used) rounded half to even, as torch.round."""
        if INTERPRETED:  # noqa: SIM108  (no libdevice there; adding 1.5·2^23 leaves no fraction bits)
            out = (x + 12582912.0) - 12582912.0
        else:
            out = libdevice.rint(x)
        return out

    @triton.jit
    def int8_heads(xf, absmax, INTERPRETED: tl.constexpr):
        """float32 xf over its head's absmax (broadcast) -> int8 at 127, rounded half to even (quantize_kv_int8)."""
        inv = tl.where(absmax > 0.0, tl.math.div_rn(tl.full(absmax.shape, 127.0, tl.float32), absmax), 0.0)
        return round_half_even(xf * inv, INTERPRETED).to(tl.int8)

    @triton.jit
    def store_head_scales(Scale, slot, width, h, HEADS: tl.constexpr, absmax):
        """An int8 cache's head scales (absmax / 127, h [BLOCK_H, 1]) for a token at slot: the scale pool holds
        [slot // width, head, slot % width]."""
        tl.store(Scale + (slot // width) * (HEADS * width) + h * width + slot % width, absmax / 127.0,
                 mask=h < HEADS)

    _I8_TO_F16 = tl.constexpr("{\n.reg .b32 b, lo, hi, m;\n"
                              "xor.b32 b, $2, 0x80808080;\n"
                              "prmt.b32 lo, b, 0x64646464, 0x4140;\n"
                              "prmt.b32 hi, b, 0x64646464, 0x4342;\n"
                              "mov.b32 m, 0x64806480;\n"
                              "sub.f16x2 $0, lo, m;\n"
                              "sub.f16x2 $1, hi, m;\n}")
    _I8_TO_F16_BIASED = tl.constexpr("{\n.reg .b32 b;\n"  # the same without the subtraction: 1152 + x
                                     "xor.b32 b, $2, 0x80808080;\n"
                                     "prmt.b32 $0, b, 0x64646464, 0x4140;\n"
                                     "prmt.b32 $1, b, 0x64646464, 0x4342;\n}")
    _I8_TO_F32_BITS = tl.constexpr("{\n.reg .b32 b;\n"  # each byte under 0x4B0000: the float 2^23 + 128 + x
                                   "xor.b32 b, $4, 0x80808080;\n"
                                   "prmt.b32 $0, b, 0x4B000000, 0x7540;\n"
                                   "prmt.b32 $1, b, 0x4B000000, 0x7541;\n"
                                   "prmt.b32 $2, b, 0x4B000000, 0x7542;\n"
                                   "prmt.b32 $3, b, 0x4B000000, 0x7543;\n}")
    I8_BIAS = tl.constexpr(INT8_BIAS)  # as jit functions read a global

    @triton.jit
    def int8_to_f16(x, ASM: tl.constexpr, EARLY: tl.constexpr, BIASED: tl.constexpr):
        """int8 -> fp16, exact. ASM (on CUDA; the interpreter runs no PTX): four values a time in five ALU
        instructions instead of four conversions: each byte, its sign bit flipped, under an 0x64 high byte is the
        fp16 1024 + x + 128, and 1152 is subtracted.
        EARLY: convert where the tile was loaded (declared impure, so the compiler cannot move the conversion past
        the layout change to a dot's operand): the fp16 tile then reaches the dot by ldmatrix, where a pure
        conversion has the int8 tile read from shared memory a byte at a time.
        BIASED: 1152 + x, exact too, two fewer instructions per four values: the caller subtracts 1152 times the
        other operand's sum from the dot's result."""
        if ASM:
            return tl.inline_asm_elementwise(_I8_TO_F16_BIASED if BIASED else _I8_TO_F16, "=r,=r,r", [x],
                                             dtype=tl.float16, is_pure=not EARLY, pack=4)
        elif BIASED:
            return x.to(tl.float16) + I8_BIAS
        else:
            return x.to(tl.float16)

    @triton.jit
    def int8_to_f32(x, ASM: tl.constexpr):
        """int8 -> float32, exact, without a conversion instruction: 2^23 + 128 + x is a float32 whose low mantissa
        byte is x with its sign bit flipped, and 8388736 is subtracted. ASM: that word built by a byte permute, four
        values from one xor and four permutes; else by an integer add."""
        if ASM:
            bits = tl.inline_asm_elementwise(_I8_TO_F32_BITS, "=r,=r,=r,=r,r", [x], dtype=tl.float32, is_pure=True,
                                             pack=4)
        else:
            bits = (x.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True)
        return bits - 8388736.0
