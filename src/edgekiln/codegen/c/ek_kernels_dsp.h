/* edgekiln fast int8 kernels for ARMv7E-M (Cortex-M4/M7), header only.
 *
 * Each kernel is an always-inline function the generated NAME.c calls once per layer with literal
 * shapes, strides and zero points, so the compiler specialises it per layer (constant trip counts,
 * immediate offsets, no struct reloads) at -Os as at -O2. The DSP path uses the ACLE SIMD
 * intrinsics (__sxtb16, __smlad, __sadd16) when __ARM_FEATURE_DSP is defined; elsewhere the same
 * algorithm runs on portable C emulations of those instructions. Both are integer-exact and equal,
 * bit for bit, the portable reference kernels in ek_kernels.c (the oracle, tests/golden).
 *
 * Data layouts, all prepared at export time by edgekiln/codegen/emit.py:
 *  - conv (im2col): each output pixel's window becomes kp int16 values (x - input_zp; 0 for padding)
 *    stored as kp / 2 uint32 words. With in_c a multiple of 4, each group of 4 values x0..x3 is the word
 *    pair (x0 | x2 << 16), (x1 | x3 << 16): exactly what __sxtb16 makes of a word of 4 int8, so the
 *    weights stay in their natural OHWI order. Otherwise each row of k_w * in_c taps is cut into pairs
 *    (x0 | x1 << 16), a row of odd length padded with 0, and the weights are stored in the same pairs,
 *    each group of 4 as (w0, w2, w1, w3) so that __sxtb16 gives back (w0, w1) and (w2, w3). Either way
 *    kp = 2 * k_h * ceil(k_w * in_c / 2) rounded up to a multiple of 4, the weight rows zero-padded.
 *  - fully connected / pointwise (GEMM): int8 inputs used as they are; the input offset is folded
 *    into the bias (bias - input_zp * sum(w), modulo 2^32), weight rows natural.
 *  - depthwise: per block of 4 channels and pair of taps (t0, t1), two words
 *    (w[t0][c0], w[t0][c2], w[t1][c0], w[t1][c2]), (w[t0][c1], w[t0][c3], w[t1][c1], w[t1][c3]); an odd tap
 *    count is padded with a zero-weight tap; bias folded as for GEMM; padded taps read a row of zero points.
 *  - requantization: one word per channel, (mant << 8) | (rshift - 24), see ek_requant_b32_packed; in the
 *    fixed-point mode (EK_REQUANT_FIXED_POINT) two, TFLite Micro's multiplier q and s = -shift - 1, see
 *    ek_requant_fixed_pair.
 *
 * Needs a little-endian target for the DSP path (every Cortex-M is); the portable path assembles
 * words from bytes and runs on any host.
 */
#ifndef EK_KERNELS_DSP_H
#define EK_KERNELS_DSP_H

#include <stdint.h>
#include "ek_kernels.h"

#if defined(__GNUC__) || defined(__clang__)
#define EK_INLINE static inline __attribute__((always_inline))
#define EK_ALIGN4 __attribute__((aligned(4)))
/* NOTE: the per-layer functions stay separate: inlined all into one function, GCC allocated registers
 * worse and the MNIST CNN ran 13% more instructions. */
#define EK_LAYER static __attribute__((noinline))
#else
#define EK_INLINE static inline
#define EK_ALIGN4
#define EK_LAYER static
#endif

#if defined(__ARM_FEATURE_DSP) && !defined(EK_NO_DSP)
#include <string.h>
#include <arm_acle.h>
#define EK_DSP 1
EK_INLINE uint32_t ek_ld32(const void *p) {
    uint32_t v;
    memcpy(&v, p, 4); /* one LDR: unaligned access is allowed on ARMv7-M */
    return v;
}
/* (b0, b2) and (b1, b3) of a word of 4 int8, sign-extended to int16 pairs. */
EK_INLINE uint32_t ek_sxtb16_even(uint32_t w) { return (uint32_t)__sxtb16((int32_t)w); }
EK_INLINE uint32_t ek_sxtb16_odd(uint32_t w) {
#if defined(__GNUC__) || defined(__clang__)
    uint32_t r; /* the rotation is part of SXTB16; GCC 12 does not fold it in (one register and instruction less) */
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
    return r;
#else
    return (uint32_t)__sxtb16((int32_t)((w >> 8) | (w << 24)));
#endif
}
EK_INLINE int32_t ek_smlad(uint32_t a, uint32_t b, int32_t acc) { return __smlad((int32_t)a, (int32_t)b, acc); }
EK_INLINE uint32_t ek_sadd16(uint32_t a, uint32_t b) { return (uint32_t)__sadd16((int32_t)a, (int32_t)b); }
EK_INLINE int32_t ek_sat8(int32_t v) { return __ssat(v, 8); }
#if defined(__GNUC__) || defined(__clang__)
/* (lo half of a, lo half of b) and (hi half of a, hi half of b) as int16 pairs: PKHBT / PKHTB, which GCC 12
 * does not form from the C below (5 instructions instead of 2). */
EK_INLINE uint32_t ek_pack_lo(uint32_t a, uint32_t b) {
    uint32_t r;
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
EK_INLINE uint32_t ek_pack_hi(uint32_t a, uint32_t b) {
    uint32_t r;
    __asm__("pkhtb %0, %2, %1, asr #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
#define EK_HAVE_PACK 1
#endif
#else
#define EK_DSP 0
EK_INLINE uint32_t ek_ld32(const void *p) {
    const uint8_t *b = (const uint8_t *)p;
    return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}
EK_INLINE uint32_t ek_sext8(uint32_t b) { return ((b & 0xFFu) ^ 0x80u) - 0x80u; }
EK_INLINE uint32_t ek_sxtb16_even(uint32_t w) {
    return (ek_sext8(w) & 0xFFFFu) | (ek_sext8(w >> 16) << 16);
}
EK_INLINE uint32_t ek_sxtb16_odd(uint32_t w) { return ek_sxtb16_even(w >> 8); }
EK_INLINE int32_t ek_s16(uint32_t h) { return (int32_t)((h & 0xFFFFu) ^ 0x8000u) - 0x8000; }
/* Wrapping int32 from uint32 without implementation-defined conversions. */
EK_INLINE int32_t ek_u2i(uint32_t v) { return v <= 0x7FFFFFFFu ? (int32_t)v : -(int32_t)(~v) - 1; }
EK_INLINE int32_t ek_smlad(uint32_t a, uint32_t b, int32_t acc) {
    const uint32_t lo = (uint32_t)(ek_s16(a) * ek_s16(b));
    const uint32_t hi = (uint32_t)(ek_s16(a >> 16) * ek_s16(b >> 16));
    return ek_u2i((uint32_t)acc + lo + hi);
}
EK_INLINE uint32_t ek_sadd16(uint32_t a, uint32_t b) {
    return ((a + b) & 0xFFFFu) | (((a >> 16) + (b >> 16)) << 16);
}
EK_INLINE int32_t ek_sat8(int32_t v) { return v < -128 ? -128 : (v > 127 ? 127 : v); }
#endif

/* Inline assembly for the hottest loop: GCC/Clang on ARM with optimization (the loop takes literal
 * offsets); -DEK_NO_ASM keeps the C. */
#if EK_DSP && defined(__OPTIMIZE__) && (defined(__GNUC__) || defined(__clang__)) && !defined(EK_NO_ASM)
#define EK_ASM 1
#else
#define EK_ASM 0
#endif

/* Most taps of a depthwise kernel (7x7 and the zero-weight pad tap); edgekiln.codegen.fast_kernels.MAX_DW_TAPS. */
#define EK_MAX_DW_TAPS 50

#if !defined(EK_HAVE_PACK)
EK_INLINE uint32_t ek_pack_lo(uint32_t a, uint32_t b) { return (a & 0xFFFFu) | (b << 16); }
EK_INLINE uint32_t ek_pack_hi(uint32_t a, uint32_t b) { return (b & 0xFFFF0000u) | (a >> 16); }
#endif

/* int16 pair (lo, hi) as one word. */
EK_INLINE uint32_t ek_pack16(int32_t lo, int32_t hi) { return ((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16); }

EK_INLINE int32_t ek_max32(int32_t a, int32_t b) { return a > b ? a : b; }

/* ek_requant_b32 (float32-exact) from one packed word m = (mant << 8) | t, t = rshift - 24 in [1, 31].
 * Fast path: with a = |acc| < 2^24, float(acc) is exact and a * mant * 2^8 = hi:lo holds the product
 * exactly; its value over 2^(32 + t) is the real result v = a * s. The float32 product rounds a * mant to
 * 24 significant bits before the final rounding, moving v by at most 2^-16 whenever v < 512 (beyond, both
 * results saturate int8 the same way). So rounding v directly (half up) is exact unless v's fraction is
 * within 2^-15 of 1/2 (frac below is truncated: 2^-17 of margin on each side); those rare cases, and
 * |acc| >= 2^24, take ek_requant_b32. NOTE: exact on every int8 output, not on the int32 value itself. */
EK_INLINE int32_t ek_requant_b32_packed(int32_t acc, uint32_t m) {
    const uint32_t t = m & 0xFFu;
    const uint32_t a = acc < 0 ? 0u - (uint32_t)acc : (uint32_t)acc;
    const uint64_t p = (uint64_t)a * (m & 0xFFFFFF00u);
    const uint32_t hi = (uint32_t)(p >> 32);
    const uint32_t frac = (hi << (32u - t)) | ((uint32_t)p >> t);
    const int32_t q = (int32_t)((hi >> t) + (frac >> 31));
    if ((a >> 24) != 0 || frac - 0x7FFE0000u <= 0x40000u) {
        return ek_requant_b32(acc, (int32_t)(m >> 8), (int32_t)t + 24);
    }
    return acc < 0 ? -q : q;
}

/* uint32 -> int32 bits without implementation-defined conversions. */
EK_INLINE int32_t ek_as_i32(uint32_t v) { return v <= 0x7FFFFFFFu ? (int32_t)v : -(int32_t)(~v) - 1; }

/* ek_requant_fixed (TFLite Micro's arithmetic) from one word pair rq = (q, s), s = -shift - 1.
 * With a right shift r = s + 1 >= 1 the doubling high multiply x = floor((acc*q + 2^30) / 2^31) and the rounding
 * shift (x / 2^r, ties away from zero) fold into one 64-bit sum, because nested floors of divisions compose:
 *     y = floor((acc*q + 2^30 + 2^(31+s) - [acc < 0] * 2^31) / 2^(32+s)) = (high word) >> s
 * (the -2^31 moves a negative tie away from zero, as the rounding shift does for x < 0; acc < 0 with x == 0
 * gives 0 either way). One SMLAL and a few ALU instructions; s = -1 (no shift) takes ek_requant_fixed.
 * GCC/Clang shift signed values arithmetically; other compilers take ek_requant_fixed. */
EK_INLINE int32_t ek_requant_fixed_pair(int32_t acc, const uint32_t *rq) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(EK_NO_BUILTINS)
    const int32_t q = (int32_t)rq[0], s = (int32_t)rq[1];
    uint32_t t;
    int64_t k, v;
    if (s < 0) {
        return ek_requant_fixed(acc, q, 0);
    }
    t = 1u << s;
    k = (int64_t)(((uint64_t)(t >> 1) << 32) | (0x40000000u | (t << 31)));  /* 2^30 + 2^(31+s) */
    v = (int64_t)acc * q + k + (int64_t)(int32_t)((uint32_t)acc & 0x80000000u);
    return (int32_t)(v >> 32) >> s;
#else
    return ek_requant_fixed(acc, ek_as_i32(rq[0]), -ek_as_i32(rq[1]) - 1);
#endif
}

/* Requantize, add the output zero point, clamp, as int8. rq: packed words (fast) or NULL with mult/shift;
 * in the fixed-point mode always rq, two words per channel (ek_requant_fixed_pair). */
EK_INLINE int8_t ek_requant_out(int32_t acc, const uint32_t *rq, const int32_t *mult, const int32_t *shift,
                                int32_t c, int32_t output_zp, int32_t act_min, int32_t act_max) {
#if EK_REQUANT_FIXED_POINT
    int32_t y = ek_sat8(ek_requant_fixed_pair(acc, rq + 2 * c) + output_zp);
    (void)mult;
    (void)shift;
#else
    int32_t y = ek_sat8((rq != 0 ? ek_requant_b32_packed(acc, rq[c]) : ek_requant_b32(acc, mult[c], shift[c]))
                        + output_zp);
#endif
    if (act_min > -128) {
        y = y < act_min ? act_min : y;
    }
    if (act_max < 127) {
        y = y > act_max ? act_max : y;
    }
    return (int8_t)y;
}

/* ---- im2col ---------------------------------------------------------------------------------- */

/* The window of output pixel (oy, ox) as kp/2 words (see the layout above). */
EK_INLINE void ek_im2col_pixel(uint32_t *dst, const int8_t *in, int32_t oy, int32_t ox, int32_t in_h, int32_t in_w,
                               int32_t in_c, int32_t k_h, int32_t k_w, int32_t stride_h, int32_t stride_w,
                               int32_t pad_top, int32_t pad_left, int32_t kp, int32_t input_zp) {
    const int32_t iy0 = oy * stride_h - pad_top;
    const int32_t ix0 = ox * stride_w - pad_left;
    const int32_t row = k_w * in_c;
    int32_t ky, kx, c;
    if ((in_c & 3) == 0) {
        const uint32_t nzp2 = ek_pack16(-input_zp, -input_zp);
        for (ky = 0; ky < k_h; ++ky) {
            const int32_t iy = iy0 + ky;
            if (iy < 0 || iy >= in_h) {
                for (c = 0; c < row; c += 4, dst += 2) {
                    dst[0] = 0;
                    dst[1] = 0;
                }
                continue;
            }
            if (ix0 >= 0 && ix0 + k_w <= in_w) { /* the whole row of taps is one contiguous run */
                const int8_t *src = in + (iy * in_w + ix0) * in_c;
                for (c = 0; c < row; c += 4, dst += 2) {
                    const uint32_t w = ek_ld32(src + c);
                    dst[0] = ek_sadd16(ek_sxtb16_even(w), nzp2);
                    dst[1] = ek_sadd16(ek_sxtb16_odd(w), nzp2);
                }
                continue;
            }
            for (kx = 0; kx < k_w; ++kx) {
                const int32_t ix = ix0 + kx;
                if (ix < 0 || ix >= in_w) {
                    for (c = 0; c < in_c; c += 4, dst += 2) {
                        dst[0] = 0;
                        dst[1] = 0;
                    }
                } else {
                    const int8_t *src = in + (iy * in_w + ix) * in_c;
                    for (c = 0; c < in_c; c += 4, dst += 2) {
                        const uint32_t w = ek_ld32(src + c);
                        dst[0] = ek_sadd16(ek_sxtb16_even(w), nzp2);
                        dst[1] = ek_sadd16(ek_sxtb16_odd(w), nzp2);
                    }
                }
            }
        }
    } else { /* any channel count: each row of taps as int16 pairs (x[j], x[j + 1]), odd rows padded with 0 */
        const int32_t pairs = (row + 1) / 2;
        int32_t j;
        for (ky = 0; ky < k_h; ++ky) {
            const int32_t iy = iy0 + ky;
            if (iy < 0 || iy >= in_h) {
                for (j = 0; j < pairs; ++j) {
                    *dst++ = 0;
                }
            } else if (ix0 >= 0 && ix0 + k_w <= in_w) {
                const int8_t *src = in + (iy * in_w + ix0) * in_c;
                for (j = 0; j + 1 < row; j += 2) {
                    *dst++ = ek_pack16((int32_t)src[j] - input_zp, (int32_t)src[j + 1] - input_zp);
                }
                if (row & 1) {
                    *dst++ = ek_pack16((int32_t)src[row - 1] - input_zp, 0);
                }
            } else {
                const int8_t *src = in + iy * in_w * in_c;
                for (j = 0; j < row; j += 2) {
                    int32_t v0 = 0, v1 = 0;
                    kx = ix0 + j / in_c;
                    if (kx >= 0 && kx < in_w) {
                        v0 = (int32_t)src[kx * in_c + j % in_c] - input_zp;
                    }
                    kx = ix0 + (j + 1) / in_c;
                    if (j + 1 < row && kx >= 0 && kx < in_w) {
                        v1 = (int32_t)src[kx * in_c + (j + 1) % in_c] - input_zp;
                    }
                    *dst++ = ek_pack16(v0, v1);
                }
            }
        }
        if ((k_h * pairs) & 1) {
            *dst = 0; /* kp is a multiple of 4: one more zero pair */
        }
    }
    (void)kp;
}

/* ---- dot products over im2col rows ----------------------------------------------------------- */

typedef struct {
    int32_t a0, b0, a1, b1; /* pixel a / b, channel 0 / 1 */
} ek_acc4;

/* Two im2col rows (pixels a at col, b at col + words) times two weight rows (channels 0 at w0, 1 at w0 + kp). */
EK_INLINE ek_acc4 ek_dot_2px_2ch(const uint32_t *col, int32_t words, const int8_t *w0, int32_t kp) {
    ek_acc4 r = {0, 0, 0, 0};
    const uint32_t *const end = col + kp / 2;
#if EK_DSP && EK_ASM
    if (words * 4 <= 1020) {
        /* NOTE: 18 instructions per 16 MACs (C: 23 with GCC 12, which runs out of registers and reloads the
         * loop bound); pixel b and channel 1 at immediate offsets, 13 registers. The offsets are literal
         * once the per-layer call is inlined, hence EK_ASM only when optimizing. */
        uint32_t xa0, xa1, xb0, xb1, we, wo;
        __asm__ volatile(
            "1:\n\t"
            "ldrd %[xb0], %[xb1], [%[col], %[offb]]\n\t"
            "ldrd %[xa0], %[xa1], [%[col]], #8\n\t"
            "ldr %[wo], [%[w]], #4\n\t"
            "sxtb16 %[we], %[wo]\n\t"
            "sxtb16 %[wo], %[wo], ror #8\n\t"
            "smlad %[a0], %[xa0], %[we], %[a0]\n\t"
            "smlad %[a0], %[xa1], %[wo], %[a0]\n\t"
            "smlad %[b0], %[xb0], %[we], %[b0]\n\t"
            "smlad %[b0], %[xb1], %[wo], %[b0]\n\t"
            "ldr %[wo], [%[w], %[offw]]\n\t"
            "sxtb16 %[we], %[wo]\n\t"
            "sxtb16 %[wo], %[wo], ror #8\n\t"
            "smlad %[a1], %[xa0], %[we], %[a1]\n\t"
            "smlad %[a1], %[xa1], %[wo], %[a1]\n\t"
            "smlad %[b1], %[xb0], %[we], %[b1]\n\t"
            "smlad %[b1], %[xb1], %[wo], %[b1]\n\t"
            "cmp %[col], %[end]\n\t"
            "bne 1b"
            : [a0] "+r"(r.a0), [a1] "+r"(r.a1), [b0] "+r"(r.b0), [b1] "+r"(r.b1), [col] "+r"(col), [w] "+r"(w0),
              [xa0] "=&r"(xa0), [xa1] "=&r"(xa1), [xb0] "=&r"(xb0), [xb1] "=&r"(xb1), [we] "=&r"(we), [wo] "=&r"(wo)
            : [end] "r"(end), [offb] "i"(words * 4), [offw] "i"(kp - 4)
            : "cc", "memory");
        return r;
    }
#endif
    do {
        const uint32_t xa0 = col[0], xa1 = col[1], xb0 = col[words], xb1 = col[words + 1];
        uint32_t w = ek_ld32(w0);
        uint32_t we = ek_sxtb16_even(w), wo = ek_sxtb16_odd(w);
        r.a0 = ek_smlad(xa0, we, r.a0);
        r.a0 = ek_smlad(xa1, wo, r.a0);
        r.b0 = ek_smlad(xb0, we, r.b0);
        r.b0 = ek_smlad(xb1, wo, r.b0);
        w = ek_ld32(w0 + kp);
        we = ek_sxtb16_even(w);
        wo = ek_sxtb16_odd(w);
        r.a1 = ek_smlad(xa0, we, r.a1);
        r.a1 = ek_smlad(xa1, wo, r.a1);
        r.b1 = ek_smlad(xb0, we, r.b1);
        r.b1 = ek_smlad(xb1, wo, r.b1);
        col += 2;
        w0 += 4;
    } while (col != end);
    return r;
}

/* Two im2col rows times one weight row. */
EK_INLINE ek_acc4 ek_dot_2px_1ch(const uint32_t *col, int32_t words, const int8_t *w0, int32_t kp) {
    ek_acc4 r = {0, 0, 0, 0};
    const uint32_t *const end = col + kp / 2;
    do {
        const uint32_t w = ek_ld32(w0);
        const uint32_t we = ek_sxtb16_even(w), wo = ek_sxtb16_odd(w);
        r.a0 = ek_smlad(col[0], we, r.a0);
        r.a0 = ek_smlad(col[1], wo, r.a0);
        r.b0 = ek_smlad(col[words], we, r.b0);
        r.b0 = ek_smlad(col[words + 1], wo, r.b0);
        col += 2;
        w0 += 4;
    } while (col != end);
    return r;
}

/* ---- convolution (groups 1, no dilation) ----------------------------------------------------- */

/* Output pixels two at a time (row-major order, so a pair may span two rows), channels two at a time.
 * col: 2 * kp / 2 words of scratch. */
EK_INLINE void ek_conv_s8_fast(const int8_t *in, const int8_t *w, const int32_t *bias, const uint32_t *rq,
                               const int32_t *mult, const int32_t *shift, int8_t *out, uint32_t *col,
                               int32_t in_h, int32_t in_w, int32_t in_c, int32_t out_h, int32_t out_w, int32_t out_c,
                               int32_t k_h, int32_t k_w, int32_t stride_h, int32_t stride_w, int32_t pad_top,
                               int32_t pad_left, int32_t kp, int32_t input_zp, int32_t output_zp, int32_t act_min,
                               int32_t act_max) {
    const int32_t words = kp / 2;
    const int32_t pixels = out_h * out_w;
    int32_t p, c;
    for (p = 0; p < pixels; p += 2) {
        const int32_t pb = p + 1 < pixels ? p + 1 : p; /* odd count: the last pixel twice, stored once */
        int8_t *ya = out + p * out_c;
        int8_t *yb = out + pb * out_c;
        ek_im2col_pixel(col, in, p / out_w, p % out_w, in_h, in_w, in_c, k_h, k_w, stride_h, stride_w, pad_top,
                        pad_left, kp, input_zp);
        ek_im2col_pixel(col + words, in, pb / out_w, pb % out_w, in_h, in_w, in_c, k_h, k_w, stride_h, stride_w,
                        pad_top, pad_left, kp, input_zp);
        for (c = 0; c + 1 < out_c; c += 2) {
            const ek_acc4 r = ek_dot_2px_2ch(col, words, w + c * kp, kp);
            ya[c] = ek_requant_out(r.a0 + bias[c], rq, mult, shift, c, output_zp, act_min, act_max);
            ya[c + 1] = ek_requant_out(r.a1 + bias[c + 1], rq, mult, shift, c + 1, output_zp, act_min, act_max);
            yb[c] = ek_requant_out(r.b0 + bias[c], rq, mult, shift, c, output_zp, act_min, act_max);
            yb[c + 1] = ek_requant_out(r.b1 + bias[c + 1], rq, mult, shift, c + 1, output_zp, act_min, act_max);
        }
        if (out_c & 1) {
            const ek_acc4 r = ek_dot_2px_1ch(col, words, w + c * kp, kp);
            ya[c] = ek_requant_out(r.a0 + bias[c], rq, mult, shift, c, output_zp, act_min, act_max);
            yb[c] = ek_requant_out(r.b0 + bias[c], rq, mult, shift, c, output_zp, act_min, act_max);
        }
    }
}

/* Convolution followed by a 2x2 stride-2 max pool whose windows lie inside the conv output.
 * NOTE: requantization and clamping are monotone (non-decreasing) in the accumulator, so the max of
 * the four requantized values is the requantized max accumulator: one requantization per pooled
 * output instead of four, and no conv rows stored. The top pair of pixels leaves its per-channel max
 * in `part`, the bottom pair finishes it. col: kp words (2 im2col rows) followed by out_c int32. */
EK_INLINE void ek_conv_maxpool2_s8_fast(const int8_t *in, const int8_t *w, const int32_t *bias, const uint32_t *rq,
                                        const int32_t *mult, const int32_t *shift, int8_t *out, uint32_t *col,
                                        int32_t in_h, int32_t in_w, int32_t in_c, int32_t pool_h, int32_t pool_w,
                                        int32_t out_c, int32_t k_h, int32_t k_w, int32_t stride_h, int32_t stride_w,
                                        int32_t pad_top, int32_t pad_left, int32_t kp, int32_t input_zp,
                                        int32_t output_zp, int32_t act_min, int32_t act_max) {
    const int32_t words = kp / 2;
    int32_t *const part = (int32_t *)(col + 2 * words);
    int32_t py, px, c, j;
    for (py = 0; py < pool_h; ++py) {
        for (px = 0; px < pool_w; ++px) {
            for (j = 0; j < 2; ++j) {
                ek_im2col_pixel(col, in, 2 * py, 2 * px + j, in_h, in_w, in_c, k_h, k_w, stride_h, stride_w, pad_top,
                                pad_left, kp, input_zp);
                ek_im2col_pixel(col + words, in, 2 * py + 1, 2 * px + j, in_h, in_w, in_c, k_h, k_w, stride_h,
                                stride_w, pad_top, pad_left, kp, input_zp);
                for (c = 0; c + 1 < out_c; c += 2) {
                    const ek_acc4 r = ek_dot_2px_2ch(col, words, w + c * kp, kp);
                    int32_t m0 = ek_max32(r.a0, r.b0), m1 = ek_max32(r.a1, r.b1);
                    if (j == 0) {
                        part[c] = m0;
                        part[c + 1] = m1;
                        continue;
                    }
                    m0 = ek_max32(m0, part[c]);
                    m1 = ek_max32(m1, part[c + 1]);
                    out[c] = ek_requant_out(m0 + bias[c], rq, mult, shift, c, output_zp, act_min, act_max);
                    out[c + 1] = ek_requant_out(m1 + bias[c + 1], rq, mult, shift, c + 1, output_zp, act_min, act_max);
                }
                if (out_c & 1) {
                    const ek_acc4 r = ek_dot_2px_1ch(col, words, w + c * kp, kp);
                    const int32_t m0 = ek_max32(r.a0, r.b0);
                    if (j == 0) {
                        part[c] = m0;
                    } else {
                        out[c] = ek_requant_out(ek_max32(m0, part[c]) + bias[c], rq, mult, shift, c, output_zp,
                                                act_min, act_max);
                    }
                }
            }
            out += out_c;
        }
    }
}

/* ---- GEMM: fully connected and pointwise (1x1) convolution ----------------------------------- */

/* out[r][n] for rows r < rows of x (row stride k) and n < out_n; bias already holds -input_zp * sum(w).
 * Rows two at a time (pointwise), a single row (fully connected) one at a time; k tail value by value. */
EK_INLINE void ek_gemm_s8_fast(const int8_t *x, const int8_t *w, const int32_t *bias, const uint32_t *rq,
                               const int32_t *mult, const int32_t *shift, int8_t *out, int32_t rows, int32_t k,
                               int32_t out_n, int32_t output_zp, int32_t act_min, int32_t act_max) {
    const int32_t k4 = k & ~3;
    int32_t r, n, i;
    for (r = 0; r < rows; r += 2) {
        const int32_t rb = r + 1 < rows ? r + 1 : r;
        const int8_t *xa = x + r * k;
        const int8_t *xb = x + rb * k;
        for (n = 0; n + 1 < out_n; n += 2) {
            const int8_t *w0 = w + n * k;
            const int8_t *w1 = w0 + k;
            int32_t a0 = bias[n], a1 = bias[n + 1], b0 = bias[n], b1 = bias[n + 1];
            for (i = 0; i < k4; i += 4) {
                const uint32_t va = ek_ld32(xa + i), vb = ek_ld32(xb + i);
                const uint32_t ae = ek_sxtb16_even(va), ao = ek_sxtb16_odd(va);
                const uint32_t be = ek_sxtb16_even(vb), bo = ek_sxtb16_odd(vb);
                uint32_t v = ek_ld32(w0 + i);
                uint32_t we = ek_sxtb16_even(v), wo = ek_sxtb16_odd(v);
                a0 = ek_smlad(ae, we, a0);
                a0 = ek_smlad(ao, wo, a0);
                b0 = ek_smlad(be, we, b0);
                b0 = ek_smlad(bo, wo, b0);
                v = ek_ld32(w1 + i);
                we = ek_sxtb16_even(v);
                wo = ek_sxtb16_odd(v);
                a1 = ek_smlad(ae, we, a1);
                a1 = ek_smlad(ao, wo, a1);
                b1 = ek_smlad(be, we, b1);
                b1 = ek_smlad(bo, wo, b1);
            }
            for (; i < k; ++i) {
                a0 = ek_smlad(ek_pack16(xa[i], 0), ek_pack16(w0[i], 0), a0);
                a1 = ek_smlad(ek_pack16(xa[i], 0), ek_pack16(w1[i], 0), a1);
                b0 = ek_smlad(ek_pack16(xb[i], 0), ek_pack16(w0[i], 0), b0);
                b1 = ek_smlad(ek_pack16(xb[i], 0), ek_pack16(w1[i], 0), b1);
            }
            out[r * out_n + n] = ek_requant_out(a0, rq, mult, shift, n, output_zp, act_min, act_max);
            out[r * out_n + n + 1] = ek_requant_out(a1, rq, mult, shift, n + 1, output_zp, act_min, act_max);
            out[rb * out_n + n] = ek_requant_out(b0, rq, mult, shift, n, output_zp, act_min, act_max);
            out[rb * out_n + n + 1] = ek_requant_out(b1, rq, mult, shift, n + 1, output_zp, act_min, act_max);
        }
        if (out_n & 1) {
            const int8_t *w0 = w + n * k;
            int32_t a0 = bias[n], b0 = bias[n];
            for (i = 0; i < k4; i += 4) {
                const uint32_t va = ek_ld32(xa + i), vb = ek_ld32(xb + i), v = ek_ld32(w0 + i);
                const uint32_t we = ek_sxtb16_even(v), wo = ek_sxtb16_odd(v);
                a0 = ek_smlad(ek_sxtb16_even(va), we, a0);
                a0 = ek_smlad(ek_sxtb16_odd(va), wo, a0);
                b0 = ek_smlad(ek_sxtb16_even(vb), we, b0);
                b0 = ek_smlad(ek_sxtb16_odd(vb), wo, b0);
            }
            for (; i < k; ++i) {
                a0 = ek_smlad(ek_pack16(xa[i], 0), ek_pack16(w0[i], 0), a0);
                b0 = ek_smlad(ek_pack16(xb[i], 0), ek_pack16(w0[i], 0), b0);
            }
            out[r * out_n + n] = ek_requant_out(a0, rq, mult, shift, n, output_zp, act_min, act_max);
            out[rb * out_n + n] = ek_requant_out(b0, rq, mult, shift, n, output_zp, act_min, act_max);
        }
    }
}

/* Fully connected: one input row, output features four at a time (one input load feeds 4 rows). */
EK_INLINE void ek_fc_s8_fast(const int8_t *x, const int8_t *w, const int32_t *bias, const uint32_t *rq,
                             const int32_t *mult, const int32_t *shift, int8_t *out, int32_t k, int32_t out_n,
                             int32_t output_zp, int32_t act_min, int32_t act_max) {
    const int32_t k4 = k & ~3;
    const int32_t n4 = out_n & ~3;
    int32_t n, i, j;
    for (n = 0; n < n4; n += 4) {
        const int8_t *w0 = w + n * k;
        int32_t a0 = bias[n], a1 = bias[n + 1], a2 = bias[n + 2], a3 = bias[n + 3];
        for (i = 0; i < k4; i += 4) {
            const uint32_t v = ek_ld32(x + i);
            const uint32_t xe = ek_sxtb16_even(v), xo = ek_sxtb16_odd(v);
            uint32_t u = ek_ld32(w0 + i);
            a0 = ek_smlad(xe, ek_sxtb16_even(u), a0);
            a0 = ek_smlad(xo, ek_sxtb16_odd(u), a0);
            u = ek_ld32(w0 + k + i);
            a1 = ek_smlad(xe, ek_sxtb16_even(u), a1);
            a1 = ek_smlad(xo, ek_sxtb16_odd(u), a1);
            u = ek_ld32(w0 + 2 * k + i);
            a2 = ek_smlad(xe, ek_sxtb16_even(u), a2);
            a2 = ek_smlad(xo, ek_sxtb16_odd(u), a2);
            u = ek_ld32(w0 + 3 * k + i);
            a3 = ek_smlad(xe, ek_sxtb16_even(u), a3);
            a3 = ek_smlad(xo, ek_sxtb16_odd(u), a3);
        }
        for (; i < k; ++i) {
            const uint32_t xv = ek_pack16(x[i], 0);
            a0 = ek_smlad(xv, ek_pack16(w0[i], 0), a0);
            a1 = ek_smlad(xv, ek_pack16(w0[k + i], 0), a1);
            a2 = ek_smlad(xv, ek_pack16(w0[2 * k + i], 0), a2);
            a3 = ek_smlad(xv, ek_pack16(w0[3 * k + i], 0), a3);
        }
        out[n] = ek_requant_out(a0, rq, mult, shift, n, output_zp, act_min, act_max);
        out[n + 1] = ek_requant_out(a1, rq, mult, shift, n + 1, output_zp, act_min, act_max);
        out[n + 2] = ek_requant_out(a2, rq, mult, shift, n + 2, output_zp, act_min, act_max);
        out[n + 3] = ek_requant_out(a3, rq, mult, shift, n + 3, output_zp, act_min, act_max);
    }
    for (n = n4; n < out_n; ++n) {
        const int8_t *w0 = w + n * k;
        int32_t a0 = bias[n];
        for (j = 0; j < k4; j += 4) {
            const uint32_t v = ek_ld32(x + j), u = ek_ld32(w0 + j);
            a0 = ek_smlad(ek_sxtb16_even(v), ek_sxtb16_even(u), a0);
            a0 = ek_smlad(ek_sxtb16_odd(v), ek_sxtb16_odd(u), a0);
        }
        for (; j < k; ++j) {
            a0 = ek_smlad(ek_pack16(x[j], 0), ek_pack16(w0[j], 0), a0);
        }
        out[n] = ek_requant_out(a0, rq, mult, shift, n, output_zp, act_min, act_max);
    }
}

/* ---- depthwise convolution (channel multiplier 1, no dilation) ------------------------------- */

/* taps_even = k_h * k_w rounded up to even; zp_row: in_c bytes of input_zp (read for padded taps, so that
 * the folded bias cancels them); w: see the layout above, channel blocks of 4 then the tail channels
 * (c >= in_c & ~3) tap-major per channel, natural order. */
EK_INLINE void ek_depthwise_s8_fast(const int8_t *in, const int8_t *w, const int32_t *bias, const uint32_t *rq,
                                    const int32_t *mult, const int32_t *shift, const int8_t *zp_row, int8_t *out,
                                    int32_t in_h, int32_t in_w, int32_t ch, int32_t out_h, int32_t out_w,
                                    int32_t k_h, int32_t k_w, int32_t stride_h, int32_t stride_w, int32_t pad_top,
                                    int32_t pad_left, int32_t taps_even, int32_t output_zp, int32_t act_min,
                                    int32_t act_max) {
    const int8_t *tap[EK_MAX_DW_TAPS];
    const int32_t taps = k_h * k_w;
    const int32_t c4 = ch & ~3;
    int32_t oy, ox, ky, kx, t, c;
    for (oy = 0; oy < out_h; ++oy) {
        for (ox = 0; ox < out_w; ++ox) {
            t = 0;
            for (ky = 0; ky < k_h; ++ky) {
                const int32_t iy = oy * stride_h - pad_top + ky;
                for (kx = 0; kx < k_w; ++kx, ++t) {
                    const int32_t ix = ox * stride_w - pad_left + kx;
                    tap[t] = (iy >= 0 && iy < in_h && ix >= 0 && ix < in_w) ? in + (iy * in_w + ix) * ch : zp_row;
                }
            }
            if (taps & 1) {
                tap[taps] = tap[0]; /* the zero-weight pad tap */
            }
            for (c = 0; c < c4; c += 4) {
                const int8_t *wb = w + c * taps_even;
                int32_t a0 = bias[c], a1 = bias[c + 1], a2 = bias[c + 2], a3 = bias[c + 3];
                for (t = 0; t < taps_even; t += 2, wb += 8) {
                    const uint32_t x0 = ek_ld32(tap[t] + c), x1 = ek_ld32(tap[t + 1] + c);
                    const uint32_t e0 = ek_sxtb16_even(x0), o0 = ek_sxtb16_odd(x0);
                    const uint32_t e1 = ek_sxtb16_even(x1), o1 = ek_sxtb16_odd(x1);
                    const uint32_t wa = ek_ld32(wb), wc = ek_ld32(wb + 4);
                    a0 = ek_smlad(ek_pack_lo(e0, e1), ek_sxtb16_even(wa), a0);
                    a2 = ek_smlad(ek_pack_hi(e0, e1), ek_sxtb16_odd(wa), a2);
                    a1 = ek_smlad(ek_pack_lo(o0, o1), ek_sxtb16_even(wc), a1);
                    a3 = ek_smlad(ek_pack_hi(o0, o1), ek_sxtb16_odd(wc), a3);
                }
                out[c] = ek_requant_out(a0, rq, mult, shift, c, output_zp, act_min, act_max);
                out[c + 1] = ek_requant_out(a1, rq, mult, shift, c + 1, output_zp, act_min, act_max);
                out[c + 2] = ek_requant_out(a2, rq, mult, shift, c + 2, output_zp, act_min, act_max);
                out[c + 3] = ek_requant_out(a3, rq, mult, shift, c + 3, output_zp, act_min, act_max);
            }
            for (; c < ch; ++c) {
                const int8_t *wt = w + c4 * taps_even + (c - c4) * taps;
                int32_t a0 = bias[c];
                for (t = 0; t < taps; ++t) {
                    a0 = ek_smlad(ek_pack16(tap[t][c], 0), ek_pack16(wt[t], 0), a0);
                }
                out[c] = ek_requant_out(a0, rq, mult, shift, c, output_zp, act_min, act_max);
            }
            out += ch;
        }
    }
}

#endif /* EK_KERNELS_DSP_H */
