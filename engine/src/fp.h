/* fp.h -- bit-exact number format conversions shared by the CPU backend and the CUDA kernels.
 * Every function is pure integer/float arithmetic so that host and device give identical
 * results.  Rules (docs/tensors.md):
 *   - round-to-nearest-even everywhere;
 *   - f16, bf16: IEEE (overflow -> inf, NaN kept quiet);
 *   - e4m3 (OCP FN): saturates finite overflow and +-inf to +-448, NaN -> 0x7F|sign;
 *   - e5m2: finite overflow saturates to +-57344, +-inf kept, NaN -> 0x7F|sign;
 *   - e2m1: saturates to +-6, NaN -> +0 (the format has no NaN);
 *   - ue8m0: 2^(code-127); nearest power of two, ties to the even code; <= 0 -> code 0,
 *     +inf -> 254, NaN -> 255;
 *   - float -> integer: truncation toward zero, saturating, NaN -> 0; bool: x != 0.
 */
#ifndef MOE_FP_H
#define MOE_FP_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD static inline
#endif

MOE_HD uint32_t moe__f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return (uint32_t)__float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

MOE_HD float moe__bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* 2^e as float for -149 <= e <= 127, built from bits (no libm). */
MOE_HD float moe__exp2i(int e) {
    if (e >= -126) return moe__bits_f32((uint32_t)(e + 127) << 23);
    return moe__bits_f32(1u << (e + 149));
}

/* Round a non-negative float to the nearest integer, ties to even (exact for |x| < 2^23;
 * larger floats are already integers). */
MOE_HD float moe__rint_pos(float x) {
    if (!(x < 8388608.0f)) return x;
#ifdef __CUDA_ARCH__
    return __fsub_rn(__fadd_rn(x, 8388608.0f), 8388608.0f);
#else
    float y = x + 8388608.0f; /* forces rounding at the unit place (RNE); the engine is
                                 built without fast-math, so this is not folded */
    return y - 8388608.0f;
#endif
}

/* Generic minifloat encoder: magnitude code (without sign) of finite a >= 0, rounded to
 * nearest even, for a format with M mantissa bits and exponent bias `bias` (normals with
 * biased exponent >= 1, subnormals below).  May exceed the format's range; the caller
 * applies its overflow rule. */
MOE_HD uint32_t moe__minifloat_mag(float a, int M, int bias) {
    if (a == 0.0f) return 0;
    uint32_t bits = moe__f32_bits(a);
    int e = (int)((bits >> 23) & 0xFF) - 127; /* floor(log2 a) for float normals */
    if (((bits >> 23) & 0xFF) == 0) e = -127;  /* float subnormal: below every minifloat */
    int emin = 1 - bias;
    if (e > 64) return 0xFFFFFFu;            /* far beyond any format: overflow */
    int qe = (e < emin ? emin : e) - M;      /* quantum exponent */
    /* n = a / 2^qe, computed exactly as a float scale by a power of two */
    float n;
    if (qe >= -126 && qe <= 127) {
        n = a * moe__exp2i(-qe);
    } else if (qe > 127) {
        n = a * moe__exp2i(-127) * moe__exp2i(-(qe - 127));
    } else { /* qe < -126: scale in two steps to stay exact */
        n = (a * moe__exp2i(100)) * moe__exp2i(-qe - 100);
    }
    float r = moe__rint_pos(n);
    uint32_t ni = (uint32_t)r;
    if (e < emin) return ni; /* subnormal (ni == 2^M is the smallest normal: correct code) */
    return ((uint32_t)(e + bias) << M) + (ni - (1u << M));
}

/* ---- bf16 ---- */
MOE_HD uint16_t moe__f32_to_bf16(float f) {
    uint32_t u = moe__f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
MOE_HD float moe__bf16_to_f32(uint16_t h) { return moe__bits_f32((uint32_t)h << 16); }

/* ---- f16 ---- */
MOE_HD uint16_t moe__f32_to_f16(float f) {
    uint32_t u = moe__f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FF)); /* NaN */
    if (a == 0x7F800000u) return (uint16_t)(sign | 0x7C00u);
    uint32_t m = moe__minifloat_mag(moe__bits_f32(a), 10, 15);
    if (m > 0x7BFFu) m = 0x7C00u; /* IEEE: overflow rounds to inf */
    return (uint16_t)(sign | m);
}
MOE_HD float moe__f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return moe__bits_f32(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        float v = (float)m * moe__exp2i(-24);
        return sign ? -v : v;
    }
    return moe__bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

/* ---- f8 e4m3 (OCP "FN": no inf, NaN = S.1111.111) ---- */
MOE_HD uint8_t moe__f32_to_e4m3(float f) {
    uint32_t u = moe__f32_bits(f);
    uint32_t sign = (u >> 24) & 0x80u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint8_t)(sign | 0x7F);
    if (a <= 0x3A800000u) return (uint8_t)sign; /* |f| <= 2^-10, half the least subnormal: +-0 (the tie
                                                  * to even), f32 subnormals included */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    /* the same rounding in one instruction: nearest-even, finite values and infinities past
     * 448 saturated to +-448 (spec/tensor_gpu_spec.lua casts the special values -- +-inf, 448,
     * the 464 tie, 480, huge and tiny ones -- and spec/quant_gpu_spec.lua every quantiser's
     * codes on both devices, bit for bit) */
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(0.0f), "f"(f));
    return (uint8_t)r;
#else
    if (a == 0x7F800000u) return (uint8_t)(sign | 0x7E);
    uint32_t m = moe__minifloat_mag(moe__bits_f32(a), 3, 7);
    if (m > 0x7Eu) m = 0x7E;
    return (uint8_t)(sign | m);
#endif
}
MOE_HD float moe__e4m3_to_f32(uint8_t c) {
    uint32_t e = (c >> 3) & 0xF, m = c & 7;
    float v;
    if (e == 0xF && m == 7) return moe__bits_f32(((uint32_t)(c & 0x80) << 24) | 0x7FC00000u);
    if (e == 0) v = (float)m * moe__exp2i(-9);
    else v = (float)(8 + m) * moe__exp2i((int)e - 10);
    return (c & 0x80) ? -v : v;
}

/* ---- f8 e5m2 (IEEE-like) ---- */
MOE_HD uint8_t moe__f32_to_e5m2(float f) {
    uint32_t u = moe__f32_bits(f);
    uint32_t sign = (u >> 24) & 0x80u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint8_t)(sign | 0x7F);
    if (a == 0x7F800000u) return (uint8_t)(sign | 0x7C);
    uint32_t m = moe__minifloat_mag(moe__bits_f32(a), 2, 15);
    if (m > 0x7Bu) m = 0x7B;
    return (uint8_t)(sign | m);
}
MOE_HD float moe__e5m2_to_f32(uint8_t c) {
    uint32_t e = (c >> 2) & 0x1F, m = c & 3;
    uint32_t sign = (uint32_t)(c & 0x80) << 24;
    if (e == 0x1F) return moe__bits_f32(sign | 0x7F800000u | (m ? 0x400000u : 0));
    float v = e == 0 ? (float)m * moe__exp2i(-16) : (float)(4 + m) * moe__exp2i((int)e - 17);
    return sign ? -v : v;
}

/* ---- e2m1 (4 bits: S.EE.M; values 0 .5 1 1.5 2 3 4 6) ---- */
/* The e2m1 magnitude code of a >= 0 (not NaN) by comparisons: the 7 rounding boundaries
 * between 0, 0.5, 1, 1.5, 2, 3, 4, 6, each tie going to the even code (0.25 -> 0, 0.75 -> 1,
 * 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); past 5 (inf too) saturated to 6.  The
 * same codes as moe__minifloat_mag (spec/c/test_fp.c), in a dozen instructions: the device's
 * encoder (sm_90 has no e2m1 conversion instruction). */
MOE_HD uint32_t moe__e2m1_mag_cmp(float a) {
    return (uint32_t)(a > 0.25f) + (uint32_t)(a >= 0.75f) + (uint32_t)(a > 1.25f) + (uint32_t)(a >= 1.75f) +
           (uint32_t)(a > 2.5f) + (uint32_t)(a >= 3.5f) + (uint32_t)(a > 5.0f);
}
MOE_HD uint8_t moe__f32_to_e2m1(float f) {
    uint32_t u = moe__f32_bits(f);
    uint32_t sign = (u >> 28) & 0x8u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0;
#ifdef __CUDA_ARCH__
    return (uint8_t)(sign | moe__e2m1_mag_cmp(moe__bits_f32(a)));
#else
    if (a == 0x7F800000u) return (uint8_t)(sign | 0x7);
    uint32_t m = moe__minifloat_mag(moe__bits_f32(a), 1, 1);
    if (m > 0x7u) m = 0x7;
    return (uint8_t)(sign | m);
#endif
}
/* The bf16 bits of moe__e2m1_to_f32(moe__f32_to_e2m1(f)) (the signed e2m1 value f rounds to;
 * NaN -> +0) without the code: |f| rounded to the grid of its range by adding and subtracting
 * a power of two (spacing 0.5 below 2, 1 below 4, 2 above; the f32 sum rounds to nearest even,
 * which is the even code at every tie), saturated at 6.  About 8 instructions against the
 * comparisons' dozen plus the code's widening; the device's nvfp4 quantise-and-widen path
 * (fused_qgmma.cu, qr_nvfp4_word).  spec/c/test_fp.c compares it with the code's value. */
MOE_HD uint32_t moe__e2m1_round_bf16(float f) {
    const uint32_t u = moe__f32_bits(f), a = u & 0x7FFFFFFFu;
    const float af = moe__bits_f32(a);
    const float big = af < 2.0f ? 4194304.0f : af < 4.0f ? 8388608.0f : 16777216.0f; /* 2^22, 2^23, 2^24 */
#ifdef __CUDA_ARCH__
    float r = __fsub_rn(__fadd_rn(af, big), big);
#else
    volatile float s = af + big; /* one f32 rounding, kept apart from the subtraction */
    float r = s - big;
#endif
    r = r < 6.0f ? r : 6.0f; /* NaN stays NaN here */
    if (a > 0x7F800000u) return 0;
    return ((u >> 16) & 0x8000u) | (moe__f32_bits(r) >> 16);
}
/* The same rounding as the signed e2m1 value in f32 (NaN -> +0, as the code 0 the quantiser gives). */
MOE_HD float moe__e2m1_round_f32(float f) {
    return moe__bits_f32(moe__e2m1_round_bf16(f) << 16);
}
MOE_HD float moe__e2m1_to_f32(uint8_t c) {
    uint32_t e = (c >> 1) & 3, m = c & 1;
    float v = e == 0 ? 0.5f * (float)m : (float)(2 + m) * moe__exp2i((int)e - 2);
    return (c & 8) ? -v : v;
}

/* ---- ue8m0 ---- */
MOE_HD uint8_t moe__f32_to_ue8m0(float f) {
    uint32_t u = moe__f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFF;
    if (f <= 0.0f) return 0;
    if (u == 0x7F800000u) return 254;
    uint32_t be = (u >> 23) & 0xFF, man = u & 0x7FFFFF;
    if (be == 0) { /* float subnormal: 2^-127 (code 0) or 2^-126 (code 1) */
        /* value = man * 2^-149; 2^-127 = 2^22 units, 2^-126 = 2^23 units; midpoint 3*2^21 */
        if (man < 3u * (1u << 21)) return 0;
        if (man > 3u * (1u << 21)) return 1;
        return 0; /* tie: even code */
    }
    uint32_t code = be; /* 2^(be-127) <= f < 2^(be-126) */
    if (man > 0x400000u) code += 1;
    else if (man == 0x400000u && (code & 1u)) code += 1;
    if (code > 254) code = 254;
    return (uint8_t)code;
}
MOE_HD float moe__ue8m0_to_f32(uint8_t c) {
    if (c == 0xFF) return moe__bits_f32(0x7FC00000u);
    if (c == 0) return moe__bits_f32(1u << 22); /* 2^-127, a float subnormal */
    return moe__bits_f32((uint32_t)c << 23);
}

/* ---- float -> integer (truncate, saturate, NaN -> 0) ---- */
MOE_HD int64_t moe__f32_to_i64_sat(float f, int64_t lo, int64_t hi) {
    if (f != f) return 0;
    if (f <= (float)lo) return lo;
    if (f >= (float)hi) return hi;
    return (int64_t)f;
}

#endif
