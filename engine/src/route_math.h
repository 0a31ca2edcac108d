/* route_math.h -- the routing arithmetic shared by the CPU reference (cpu/route_cpu.c) and
 * the CUDA kernels (kernels/route.cu), written so that both compute bit-identical values.
 *
 * Why: ids must be EQUAL on CPU and GPU, and deepseekv3/minimax2 select on s + b with
 * s = sigmoid(l); a libm expf and CUDA's expf differ in the last bit now and then, which
 * flips near-ties.  So the engine has its own exp built only from IEEE +, -, *, / in a fixed
 * order (no fused multiply-add: the C side is built with -ffp-contract=off, the device side
 * uses the __f*_rn intrinsics, which are never contracted).  Its error is about 1 ulp.
 *
 * Selection keys: a float key is "sanitised" (NaN -> -inf, -0 -> +0) and then mapped to an
 * unsigned 32-bit integer whose unsigned order is the float order ("orderable" bits), so the
 * kernels can reduce keys with integer warp instructions.  Ties go to the lower expert index.
 */
#ifndef MOE_ROUTE_MATH_H
#define MOE_ROUTE_MATH_H

#include <stdint.h>

#include "moe.h"
#include "fp.h"

#ifdef __CUDA_ARCH__
#define MOE_RADD(a, b) __fadd_rn((a), (b))
#define MOE_RSUB(a, b) __fsub_rn((a), (b))
#define MOE_RMUL(a, b) __fmul_rn((a), (b))
#define MOE_RDIV(a, b) __fdiv_rn((a), (b))
#define MOE_RFMA(a, b, c) __fmaf_rn((a), (b), (c))
#define MOE_RRCP(a) __frcp_rn(a)
#else
#include <math.h>
#define MOE_RADD(a, b) ((a) + (b))
#define MOE_RSUB(a, b) ((a) - (b))
#define MOE_RMUL(a, b) ((a) * (b))
#define MOE_RDIV(a, b) ((a) / (b))
#define MOE_RFMA(a, b, c) fmaf((a), (b), (c)) /* exactly one rounding, as __fmaf_rn */
#define MOE_RRCP(a) (1.0f / (a))              /* correctly rounded, as __frcp_rn */
#endif

#define MOE_ROUTE_EPS 1e-20f

MOE_HD float moe__route_inf(void) { return moe__bits_f32(0x7F800000u); }

/* NaN -> -inf; -0 -> +0 (x + 0 is +0 for x = -0 in round-to-nearest). */
MOE_HD float moe__route_sanitize(float x) {
    if (x != x) return moe__bits_f32(0xFF800000u);
    return MOE_RADD(x, 0.0f);
}

/* exp(x) in float, reproducible on host and device.  exp(-inf) = 0, exp(+inf) = +inf,
 * exp(NaN) = NaN; overflow gives +inf, underflow 0 (subnormal results are produced).
 * Fused multiply-adds are used explicitly (fmaf / __fmaf_rn: one rounding on both sides). */
MOE_HD float moe__route_expf(float x) {
    if (x != x) return x;
    x = x < -104.0f ? -104.0f : x; /* exp(-104) rounds to 0 */
    x = x > 89.0f ? 89.0f : x;     /* exp(89) overflows to +inf */
    /* n = round(x / ln 2) by the 1.5 * 2^23 trick (|x * log2 e| < 2^22) */
    float nf = MOE_RSUB(MOE_RFMA(x, 1.44269502162933349609375f, 12582912.0f), 12582912.0f);
    int n = (int)nf;
    /* r = x - n ln2 with a two-part ln 2 */
    float r = MOE_RFMA(nf, -0.693145751953125f, x);
    r = MOE_RFMA(nf, -1.428606765330187045e-06f, r);
    /* exp(r), |r| <= 0.35: Taylor to degree 7 (truncation < 6e-9 relative), Horner */
    float p = 1.98412698412698e-04f;                /* 1/5040 */
    p = MOE_RFMA(p, r, 1.38888888888889e-03f);      /* 1/720 */
    p = MOE_RFMA(p, r, 8.33333333333333e-03f);      /* 1/120 */
    p = MOE_RFMA(p, r, 4.16666666666667e-02f);      /* 1/24 */
    p = MOE_RFMA(p, r, 1.66666666666667e-01f);      /* 1/6 */
    p = MOE_RFMA(p, r, 0.5f);
    p = MOE_RFMA(p, r, 1.0f);
    p = MOE_RFMA(p, r, 1.0f);
    /* p * 2^n, n in [-150, 129], in two exact-then-rounded steps: 2^n1 * 2^n2 with
     * n1 = floor(n/2), n2 = n - n1 both in the normal range */
    int n1 = n >> 1, n2 = n - n1;
    return MOE_RMUL(MOE_RMUL(p, moe__bits_f32((uint32_t)(n1 + 127) << 23)),
                    moe__bits_f32((uint32_t)(n2 + 127) << 23));
}

/* sigmoid(x) = 1 / (1 + exp(-x)) (a correctly rounded reciprocal); sigmoid(+inf) = 1,
 * sigmoid(-inf) = 0, NaN stays NaN. */
MOE_HD float moe__route_sigmoid(float x) {
    return MOE_RRCP(MOE_RADD(1.0f, moe__route_expf(-x)));
}

/* sigmoid(sanitize(x)) for any x, without the NaN tests (the kernels' hot path; the same bits
 * as moe__route_sigmoid(moe__route_sanitize(x)), checked for all 2^32 inputs):
 *   - NaN: fails `y < 89` and is clamped to 89, as -inf (the sanitised NaN) is;
 *   - -0: exp(+0) and exp(-0) are both exactly 1;
 *   - n = round(y / ln 2) read from the bits of the 1.5 * 2^23 sum (an integer add instead of a
 *     float-to-int conversion: the same n).
 * moe__route_expneg_raw(x) is the exp(-sanitize(x)) inside it. */
MOE_HD float moe__route_expneg_raw(float x) {
    float y = -x;
    y = y < 89.0f ? y : 89.0f;          /* NaN fails the test: 89 */
    y = y > -104.0f ? y : -104.0f;
    const float t = MOE_RFMA(y, 1.44269502162933349609375f, 12582912.0f);
    const float nf = MOE_RSUB(t, 12582912.0f);
    const int n = (int)(moe__f32_bits(t) - 0x4B400000u);
    float r = MOE_RFMA(nf, -0.693145751953125f, y);
    r = MOE_RFMA(nf, -1.428606765330187045e-06f, r);
    float p = 1.98412698412698e-04f;
    p = MOE_RFMA(p, r, 1.38888888888889e-03f);
    p = MOE_RFMA(p, r, 8.33333333333333e-03f);
    p = MOE_RFMA(p, r, 4.16666666666667e-02f);
    p = MOE_RFMA(p, r, 1.66666666666667e-01f);
    p = MOE_RFMA(p, r, 0.5f);
    p = MOE_RFMA(p, r, 1.0f);
    p = MOE_RFMA(p, r, 1.0f);
    const int n1 = n >> 1, n2 = n - n1;
    return MOE_RMUL(MOE_RMUL(p, moe__bits_f32((uint32_t)(n1 + 127) << 23)), moe__bits_f32((uint32_t)(n2 + 127) << 23));
}
MOE_HD float moe__route_sigmoid_raw(float x) { return MOE_RRCP(MOE_RADD(1.0f, moe__route_expneg_raw(x))); }

/* Sum of the K chosen values (K <= 32) in the order the CUDA warp adds them: a butterfly over
 * the next power of two P >= K (values beyond K are 0), v[i] += v[i ^ o] for o = P/2 .. 1;
 * every lane ends with the same bits, equal to this.  (Host only: the device uses shuffles.) */
#ifndef __CUDA_ARCH__
static inline float moe__route_ksum(const float *v, int K) {
    float a[32], b[32];
    int P = 1;
    while (P < K) P <<= 1;
    for (int i = 0; i < P; i++) a[i] = i < K ? v[i] : 0.0f;
    for (int o = P >> 1; o > 0; o >>= 1) {
        for (int i = 0; i < P; i++) b[i] = MOE_RADD(a[i], a[i ^ o]);
        memcpy(a, b, sizeof(float) * (size_t)P);
    }
    return a[0];
}
#endif

/* Orderable bits of a sanitised float: unsigned order == float order. */
MOE_HD uint32_t moe__route_key(float x) {
    uint32_t u = moe__f32_bits(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
MOE_HD float moe__route_unkey(uint32_t k) {
    return moe__bits_f32((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

/* Methods whose selection score is s + b (sigmoid plus bias). */
MOE_HD int moe__route_uses_bias(int method) {
    return method == MOE_ROUTE_DEEPSEEKV3 || method == MOE_ROUTE_MINIMAX2;
}
/* Methods that need the softmax over all E (max m and sum S of exp(l - m)). */
MOE_HD int moe__route_needs_softmax(int method) {
    return method == MOE_ROUTE_DEFAULT || method == MOE_ROUTE_RENORMALIZE_NAIVE;
}

/* The per-selected value the weights are made of, from the (sanitised) logit x of a chosen
 * expert: exp(x - m) / S for the softmax methods, exp(x - x0) for renormalize (x0: the
 * largest chosen logit), sigmoid for the sigmoid methods, x itself for topk. */
MOE_HD float moe__route_wsrc(int method, float x, float m, float S, float x0) {
    switch (method) {
    case MOE_ROUTE_DEFAULT:
    case MOE_ROUTE_RENORMALIZE_NAIVE: return MOE_RDIV(moe__route_expf(MOE_RSUB(x, m)), S);
    case MOE_ROUTE_RENORMALIZE: return moe__route_expf(MOE_RSUB(x, x0));
    case MOE_ROUTE_TOPK: return x;
    default: return moe__route_sigmoid(x); /* sigmoid_renorm, deepseekv3, minimax2, llama4 */
    }
}

/* Final weight from the value v of one chosen expert and the sum (in selection order,
 * float) of the values of all K chosen. */
MOE_HD float moe__route_weight(int method, float v, float sum, float scale, int normalize) {
    switch (method) {
    case MOE_ROUTE_RENORMALIZE:
    case MOE_ROUTE_RENORMALIZE_NAIVE: return MOE_RDIV(v, sum);
    case MOE_ROUTE_SIGMOID_RENORM:
        return normalize ? MOE_RDIV(v, sum > MOE_ROUTE_EPS ? sum : MOE_ROUTE_EPS) : v;
    case MOE_ROUTE_DEEPSEEKV3: return MOE_RMUL(MOE_RDIV(v, MOE_RADD(sum, MOE_ROUTE_EPS)), scale);
    case MOE_ROUTE_MINIMAX2: return MOE_RDIV(v, MOE_RADD(sum, MOE_ROUTE_EPS));
    default: return v; /* default, topk, llama4 */
    }
}

/* 1 when the weights need the sum over the chosen values. */
MOE_HD int moe__route_needs_sum(int method, int normalize) {
    return method == MOE_ROUTE_RENORMALIZE || method == MOE_ROUTE_RENORMALIZE_NAIVE ||
           method == MOE_ROUTE_DEEPSEEKV3 || method == MOE_ROUTE_MINIMAX2 ||
           (method == MOE_ROUTE_SIGMOID_RENORM && normalize);
}

#endif
