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
#else
#define MOE_RADD(a, b) ((a) + (b))
#define MOE_RSUB(a, b) ((a) - (b))
#define MOE_RMUL(a, b) ((a) * (b))
#define MOE_RDIV(a, b) ((a) / (b))
#endif

#define MOE_ROUTE_EPS 1e-20f

MOE_HD float moe__route_inf(void) { return moe__bits_f32(0x7F800000u); }

/* NaN -> -inf; -0 -> +0 (x + 0 is +0 for x = -0 in round-to-nearest). */
MOE_HD float moe__route_sanitize(float x) {
    if (x != x) return moe__bits_f32(0xFF800000u);
    return MOE_RADD(x, 0.0f);
}

/* exp(x) in float, reproducible on host and device.  exp(-inf) = 0, exp(+inf) = +inf,
 * exp(NaN) = NaN; overflow gives +inf, underflow 0 (subnormal results are produced). */
MOE_HD float moe__route_expf(float x) {
    if (x != x) return x;
    if (x > 88.72284f) return moe__route_inf();
    if (x < -103.97208f) return 0.0f;
    /* n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x * log2 e| < 2^22) */
    float t = MOE_RADD(MOE_RMUL(x, 1.44269502162933349609375f), 12582912.0f);
    float nf = MOE_RSUB(t, 12582912.0f);
    int n = (int)nf;
    /* r = x - n ln2 with a two-part ln 2 (ln2_hi has 15 significant bits: n*ln2_hi exact) */
    float r = MOE_RSUB(x, MOE_RMUL(nf, 0.693145751953125f));
    r = MOE_RSUB(r, MOE_RMUL(nf, 1.428606765330187045e-06f));
    /* exp(r), |r| <= 0.35: Taylor to degree 7 (truncation < 6e-9 relative), Horner */
    float p = 1.98412698412698e-04f;               /* 1/5040 */
    p = MOE_RADD(MOE_RMUL(p, r), 1.38888888888889e-03f); /* 1/720 */
    p = MOE_RADD(MOE_RMUL(p, r), 8.33333333333333e-03f); /* 1/120 */
    p = MOE_RADD(MOE_RMUL(p, r), 4.16666666666667e-02f); /* 1/24 */
    p = MOE_RADD(MOE_RMUL(p, r), 1.66666666666667e-01f); /* 1/6 */
    p = MOE_RADD(MOE_RMUL(p, r), 0.5f);
    p = MOE_RADD(MOE_RMUL(p, r), 1.0f);
    p = MOE_RADD(MOE_RMUL(p, r), 1.0f);
    /* scale by 2^n, n in [-150, 128] */
    if (n > 127) return MOE_RMUL(MOE_RMUL(p, moe__exp2i(127)), moe__exp2i(n - 127));
    if (n < -126) return MOE_RMUL(MOE_RMUL(p, moe__exp2i(n + 64)), moe__exp2i(-64));
    return MOE_RMUL(p, moe__exp2i(n));
}

/* sigmoid(x) = 1 / (1 + exp(-x)); sigmoid(+inf) = 1, sigmoid(-inf) = 0, NaN stays NaN. */
MOE_HD float moe__route_sigmoid(float x) {
    return MOE_RDIV(1.0f, MOE_RADD(1.0f, moe__route_expf(-x)));
}

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
