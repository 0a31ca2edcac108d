/* quant_math.h -- the quantisation modes' scalar numerics, shared by the CPU reference
 * (engine/src/cpu/quant_cpu.c) and the CUDA kernels (kernels/quant.cu), so both compute
 * every scale and code with the same f32 operations, one IEEE rounding each (divisions and
 * products are written as moe__q_div / moe__q_mul: __fdiv_rn / __fmul_rn on the device, so
 * nothing is contracted into an FMA or approximated).  docs/quantization.md states the rules.
 *
 * amax is taken as the maximum of the absolute values' bit patterns (moe__q_absbits), which
 * is exact and independent of the reduction order; a NaN input makes the amax NaN.  NaNs
 * are made canonical (0x7FC00000, positive codes) wherever their payload or sign could
 * otherwise differ between the host and the device. */
#ifndef MOE_QUANT_MATH_H
#define MOE_QUANT_MATH_H

#include "fp.h"
#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The qtensor record (engine/src/quant.c owns its life cycle). */
struct moe_qtensor {
    int mode;             /* moe_quant_mode */
    int ndim;             /* 2 or 3 */
    int64_t shape[3];     /* logical [N, K] or [E, N, K] */
    int block_rows;       /* rows sharing a scale (fp8: N; bf16: 0) */
    int block_cols;       /* columns (along K) sharing a scale (fp8: K; bf16: 0) */
    moe_tensor *data;     /* contiguous codes [.., N, K] */
    moe_tensor *scales;   /* contiguous, NULL for bf16 */
    moe_tensor *global;   /* nvfp4: f32 per matrix; else NULL */
};

/* Matrices, rows and columns of a qtensor's logical shape. */
static inline int64_t moe__q_mats(const struct moe_qtensor *q) { return q->ndim == 3 ? q->shape[0] : 1; }
static inline int64_t moe__q_rows(const struct moe_qtensor *q) { return q->shape[q->ndim - 2]; }
static inline int64_t moe__q_cols(const struct moe_qtensor *q) { return q->shape[q->ndim - 1]; }

/* Backends (arguments validated and outputs allocated by quant.c; src is contiguous with
 * q's logical shape, dtype f32/bf16/f16; out contiguous f32/bf16/f16). */
moe_status moe__cpu_quantize(const moe_tensor *src, struct moe_qtensor *q);
moe_status moe__cpu_dequantize(const struct moe_qtensor *q, moe_tensor *out);

#ifdef __cplusplus
}
#endif

/* ------------------------------------------------------------ arithmetic -- */

#define MOE__Q_NAN_BITS 0x7FC00000u
#define MOE__Q_E4M3_NAN 0x7Fu  /* +NaN */
#define MOE__Q_UE8M0_NAN 0xFFu

MOE_HD float moe__q_div(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

MOE_HD float moe__q_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

MOE_HD int moe__q_isnan(float x) { return x != x; }
MOE_HD float moe__q_nan(void) { return moe__bits_f32(MOE__Q_NAN_BITS); }
/* x, with any NaN replaced by the canonical +NaN. */
MOE_HD float moe__q_canon(float x) { return x != x ? moe__q_nan() : x; }

/* |x| as bits; the maximum of these over a block is the bits of its amax (NaN above inf). */
MOE_HD uint32_t moe__q_absbits(float x) { return moe__f32_bits(x) & 0x7FFFFFFFu; }
/* amax from the maximum absolute bits (any NaN payload -> the canonical NaN). */
MOE_HD float moe__q_amax(uint32_t bits) {
    return bits > 0x7F800000u ? moe__q_nan() : moe__bits_f32(bits);
}

/* ---------------------------------------------------- fp8, fp8_block (e4m3) -- */

/* scale = amax / 448 */
MOE_HD float moe__q_fp8_scale(float amax) { return moe__q_canon(moe__q_div(amax, 448.0f)); }

/* code = e4m3(x / scale); scale 0 -> 0x00; NaN x or scale -> 0x7F */
MOE_HD uint8_t moe__q_fp8_code(float x, float scale) {
    if (scale == 0.0f) return 0;
    float v = moe__q_div(x, scale);
    if (v != v) return MOE__Q_E4M3_NAN;
    return moe__f32_to_e4m3(v);
}

/* ------------------------------------------------------------------ nvfp4 -- */

/* global = amax / (448 * 6) = amax / 2688 */
MOE_HD float moe__q_nvfp4_global(float amax) { return moe__q_canon(moe__q_div(amax, 2688.0f)); }

/* block scale code = e4m3(block_amax / (6 * global)) with 6 * global rounded to f32 first;
 * global 0 -> 0x00; NaN -> 0x7F */
MOE_HD uint8_t moe__q_nvfp4_scale(float block_amax, float global) {
    if (global == 0.0f) return 0;
    float v = moe__q_div(block_amax, moe__q_mul(6.0f, global));
    if (v != v) return MOE__Q_E4M3_NAN;
    return moe__f32_to_e4m3(v);
}

/* code = e2m1(x / (block_scale * global)) with the product rounded to f32 first; a zero
 * product -> 0 (e2m1 maps NaN to +0 by itself) */
MOE_HD uint8_t moe__q_nvfp4_code(float x, float block_scale, float global) {
    float d = moe__q_mul(block_scale, global);
    if (d == 0.0f) return 0;
    float v = moe__q_div(x, d);
    if (v != v) return 0;
    return moe__f32_to_e2m1(v);
}

/* ------------------------------------------------------------------ mxfp4 -- */

/* ue8m0 code of the smallest 2^k with amax / 2^k <= 6, from the amax bits: with
 * amax = m * 2^e (1 <= m < 2), k = e - 2 when m <= 1.5, else e - 1; code = k + 127,
 * clamped below at 0 (2^-127).  amax 0 -> 0; inf or NaN -> 0xFF (NaN). */
MOE_HD uint8_t moe__q_mx_scale(uint32_t amax_bits) {
    if (amax_bits >= 0x7F800000u) return MOE__Q_UE8M0_NAN;
    if (amax_bits == 0) return 0;
    int be = (int)(amax_bits >> 23); /* 0 for subnormals: the code clamps to 0 anyway */
    int code = be - 2 + ((amax_bits & 0x7FFFFFu) > 0x400000u ? 1 : 0);
    return (uint8_t)(code < 0 ? 0 : code);
}

/* code = e2m1(x / 2^k) (exact division by a power of two) */
MOE_HD uint8_t moe__q_mx_code(float x, uint8_t scale_code) {
    if (scale_code == MOE__Q_UE8M0_NAN) return 0;
    return moe__f32_to_e2m1(moe__q_div(x, moe__ue8m0_to_f32(scale_code)));
}

/* ----------------------------------------------------------------- mxint4 -- */

/* scale = bf16(amax / 7): the f32 quotient rounded to bf16 (nearest even); NaN -> 0x7FC0 */
MOE_HD uint16_t moe__q_int4_scale(float amax) {
    float v = moe__q_div(amax, 7.0f);
    if (v != v) return (uint16_t)(MOE__Q_NAN_BITS >> 16);
    return moe__f32_to_bf16(v);
}

/* nibble of clamp(rne(x / scale), -8, 7) in two's complement; scale 0 or NaN quotient -> 0 */
MOE_HD uint8_t moe__q_int4_code(float x, float scale) {
    if (scale == 0.0f) return 0;
    float v = moe__q_div(x, scale);
    if (v != v) return 0;
    int neg = moe__f32_bits(v) >> 31;
    float a = moe__rint_pos(neg ? -v : v);
    int q = a >= 8.0f ? 8 : (int)a;
    q = neg ? -q : q;
    if (q > 7) q = 7;
    return (uint8_t)(q & 0xF);
}

MOE_HD float moe__q_int4_value(uint8_t nibble) {
    int v = nibble & 0xF;
    return (float)(v >= 8 ? v - 16 : v);
}

/* -------------------------------------------------------------- dequantise -- */

/* value of element (code, scale) per mode, canonical NaN */
MOE_HD float moe__q_deq_fp8(uint8_t code, float scale) {
    return moe__q_canon(moe__q_mul(moe__e4m3_to_f32(code), scale));
}
/* (e2m1 * e4m3 is exact) * global */
MOE_HD float moe__q_deq_nvfp4(uint8_t code, uint8_t scale_code, float global) {
    float p = moe__q_mul(moe__e2m1_to_f32(code), moe__e4m3_to_f32(scale_code));
    return moe__q_canon(moe__q_mul(p, global));
}
MOE_HD float moe__q_deq_mxfp4(uint8_t code, uint8_t scale_code) {
    return moe__q_canon(moe__q_mul(moe__e2m1_to_f32(code), moe__ue8m0_to_f32(scale_code)));
}
MOE_HD float moe__q_deq_int4(uint8_t nibble, uint16_t scale_bf16) {
    return moe__q_canon(moe__q_mul(moe__q_int4_value(nibble), moe__bf16_to_f32(scale_bf16)));
}

#endif
