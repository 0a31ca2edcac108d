/* fused_quant.cuh -- shared by the quantised fused MoE's tile kernels (fused_quant.cu) and
 * its decode GEMV path (fused_qgemv.cu): the layout of the workspace region of the quantised
 * path and the GEMV path's entry points. */
#ifndef MOE_FUSED_QUANT_CUH
#define MOE_FUSED_QUANT_CUH

#include "cuda_common.cuh"
#include "fused_quant.h"
#include "fused_moe.cuh" /* moe__fm_act */

#include <cuda_fp8.h>
#include <stdlib.h>

/* Byte offsets into the workspace buffer of the regions moe__fused_quant_ws_bytes sizes,
 * computed from the workspace's own max_tokens, top_k, E, H and I (each region 256-aligned):
 *   misc   +0 ntiles (i32); +16 x's per-tensor scale (fp8) or global scale (nvfp4), f32;
 *          +32 the intermediate's; +64 the GEMV path's counters (MOE__FQ_NCTR u32: x chunks
 *          claimed, x chunks done, intermediate chunks claimed, done, intermediate amax bits;
 *          with block-local activations, the intermediate amax bits and the k_qv_down blocks
 *          that have read them; with no routing kernel, the routing-written flag and the
 *          k_qv_down blocks that have seen it, u32 9 unused, u64 at 10: the routed ids packed);
 *          +48 the intermediate's amax bits (nvfp4 on
 *          k_qg_rs: GEMM1 takes them); MOE__FQ_MISC_BYTES (128) holds up to 16;
 *   tiles  tile table: expert, first row, rows (wtiles i32 each);
 *   xc/xs  x codes [max_tokens, H] and scales (x made once a token on k_qg_rs: xc holds the
 *          pairs' sorted rows, i32 [P], for every mode but fp8; xs nvfp4's partial amax bits, u32 a
 *          block of the align, fp8_block's scales f32 [T, H / 128] from k_qr_fb_x, mxint4's
 *          per-token powers of two); gc/gs the intermediate's [max_pairs, I]. */
#define MOE__FQ_CTR_OFF 64
#define MOE__FQ_IAMAX_OFF 48
#define MOE__FQ_NCTR 12
static_assert(MOE__FQ_CTR_OFF + 4 * MOE__FQ_NCTR <= MOE__FQ_MISC_BYTES, "GEMV counters outside misc");
struct moe__fq_layout {
    size_t misc, tiles, xc, xs, gc, gs;
    int64_t wtiles;
};

static inline moe__fq_layout moe__fq_layout_of(const moe_workspace *ws) {
    const int64_t WP = ws->max_pairs, WT = ws->max_tokens;
    moe__fq_layout L;
    L.wtiles = WP / MOE__FQ_MIN_BM + (WP < ws->E ? WP : ws->E) + 1;
    size_t o = ws->off_fq;
    size_t *const dst[6] = {&L.misc, &L.tiles, &L.xc, &L.xs, &L.gc, &L.gs};
    const int64_t n[6] = {MOE__FQ_MISC_BYTES, L.wtiles * 12, WT * ws->H, WT * (ws->H / 16) + 16, WP * ws->I,
                          WP * (ws->I / 16) + 16};
    for (int i = 0; i < 6; i++) {
        *dst[i] = o;
        o += ((size_t)n[i] + 255) & ~(size_t)255;
    }
    return L;
}

/* Arguments of one grouped GEMM of the quantised path (tile kernels in fused_quant.cu, the
 * Hopper wgmma kernel in fused_qgmma.cu). */
struct moe__fq_gemm_args {
    /* A: G1 x (bf16 [T, Kd] for mxfp4/mxint4, else codes), G2 the intermediate likewise */
    const uint16_t *A_bf16;
    const uint8_t *A_codes;    /* e4m3 [rows, Kd] or e2m1 packed [rows, Kd/2] */
    const void *A_scales;      /* fp8_block f32 [rows, Kd/128]; nvfp4 e4m3 [rows, Kd/16] */
    const float *A_tensor;     /* fp8: the per-tensor scale; nvfp4: the global scale */
    const uint8_t *W;          /* codes [E, N, Kd] (e4m3) or packed [E, N, Kd/2] */
    const void *W_scales;      /* per mode, logical row order */
    const float *W_tensor;     /* fp8 scales [E]; nvfp4 global [E] */
    const float *bias;         /* [E, N] logical order, or NULL */
    const int32_t *sorted, *tile_e, *tile_r0, *tile_n, *ntiles;
    const float *wts;          /* [P] */
    int N, Kd, K, lo, act, llama4, I, gated;
    int E;                     /* experts in W (all, not only the local ones) */
    float alpha, beta, limit;
    uint16_t *inter;           /* G1 output bf16 [P, I] (sorted rows) */
    unsigned int *inter_amax;  /* nvfp4 on k_qg_rs: the intermediate's amax bits (GEMM1 takes them) */
    /* G1 of nvfp4 on k_qg_rs with x quantised by k_qr_nvfp4_x (else NULL): the align's inverse of
     * sorted (pair -> sorted row, -1 if not local), x's partial amax bits (A_amax_n, one a block of
     * the align's amax blocks) and x's tokens */
    const int32_t *A_pos;
    const unsigned int *A_amax;
    int A_amax_n;
    int64_t T;
    float *y;                  /* G2 output f32 [P, N] (pair rows) */
    /* MOE__FQ_I4F only: W_fold = 2^b multiplies the bf16 weight scales into f16 range, W_unfold =
     * 2^-b undoes it in the epilogue; A_rows: 2^-a of each A row (sorted order; G1: written by
     * k_qr_permute<RS, true> from the per-token ones in A_scales), by which the row was multiplied into f16
     * range */
    float W_fold, W_unfold;
    const float *A_rows;
    /* k_qg_rs of the 4-bit modes: the weight codes come with the 32-byte swizzle (1, the default)
     * or none (0: MOE_FUSED_QSW=0) */
    int W_swz;
};

/* mxint4's "f16 fold" (docs/quantization.md, "mxint4 on f16 MMAs"): an internal mode id of the
 * register-operand kernels (fused_quant.cu's k_wreg, fused_qgmma.cu's k_qg_rs), never a
 * moe_quant_mode.  The weights widen to int4 x (bf16 scale x 2^b) as f16 -- exact: the product has
 * at most 11 significant bits, and b (per matrix, moe__cuda_i4_fold at experts creation) puts
 * every scale where f16 holds it and its products -- so no per-32 promotion is left; the 16-bit
 * activations are f16 too, each row times its own power of two 2^a (largest magnitude into
 * [2^15, 2^16)); the epilogue multiplies by 2^-b x 2^-a. */
#define MOE__FQ_I4F 16
/* Whether mxint4 experts ex may run on f16 MMAs: their scales allow the fold (moe__i4_fold_of at
 * creation) and MOE_FUSED_I4F16 is not "0". */
/* Whether the environment switch `name` is exactly "0" (a fused-path switch turned off). */
static inline bool moe__fq_env_off(const char *name) {
    const char *env = getenv(name);
    return env && env[0] == '0' && env[1] == '\0';
}
static inline bool moe__fq_i4f_ok(const struct moe_experts *ex) {
    return ex->quant == MOE_QUANT_MXINT4 && ex->i4_fold13 > 0.0f && ex->i4_fold2 > 0.0f && !moe__fq_env_off("MOE_FUSED_I4F16");
}
/* mxfp4 on the Hopper register-operand kernel with its scales folded into the widening (one bf16x2
 * multiply a pair: e2m1 x 2^-126 as placed, times 2^(k - 1) = the scale x 2^126, a bf16 while
 * k <= 128): where every scale code of the experts is at most 128 (moe_experts.mx_small) and
 * MOE_FUSED_MXS is not "0".  The same values as MOE_QUANT_MXFP4's two multiplies. */
#define MOE__FQ_F4S 17
static inline bool moe__fq_f4s_ok(const struct moe_experts *ex) {
    return ex->quant == MOE_QUANT_MXFP4 && ex->mx_small && !moe__fq_env_off("MOE_FUSED_MXS");
}

/* Decode GEMV path (fused_qgemv.cu): every quantisation mode, 1 <= T <= the bound of
 * MOE_FUSED_QGEMV (unset: 4; "0": off), local_count > 0.  moe__fq_gemv_eligible says whether
 * a call of moe__cuda_fused_quant takes it; moe__fq_gemv then does the whole call after
 * routing (2 launches on g.stream). */
/* Epilogue of two adjacent output columns of one row, shared by the tile kernels
 * (fused_quant.cu) and the Hopper kernels (fused_qgmma.cu): the f32 sums times the per-tensor
 * scale ts (1 where the scales were applied per group), then
 *   GEMM1 gated: llama4's routing weight c1, the biases of gate columns ng, ng+1 and of their up
 *                columns, the activation, bf16 into orow[ng], orow[ng+1];
 *   GEMM1 relu2: the same on columns n, n+1;
 *   GEMM2:       bias, times the routing weight wt, f32 into yrow[n], yrow[n+1].
 * bias: the expert's row of a.bias, or null. */
template <int ACT = -1>
__device__ __forceinline__ void moe__fq_epi_gated2(const moe__fq_gemm_args &a, uint16_t *orow, const float *bias,
                                                   int ng, float g0, float g1, float u0, float u1, float ts,
                                                   float c1) {
    g0 *= ts;
    g1 *= ts;
    u0 *= ts;
    u1 *= ts;
    if (a.llama4) {
        g0 *= c1;
        g1 *= c1;
        u0 *= c1;
        u1 *= c1;
    }
    if (bias) {
        g0 += bias[ng];
        g1 += bias[ng + 1];
        u0 += bias[a.I + ng];
        u1 += bias[a.I + ng + 1];
    }
    const int act = ACT >= 0 ? ACT : a.act;
    const float v0 = moe__fm_act(act, g0, u0, a.alpha, a.beta, a.limit);
    const float v1 = moe__fm_act(act, g1, u1, a.alpha, a.beta, a.limit);
    *(uint32_t *)(orow + ng) = (uint32_t)moe__f32_to_bf16(v0) | ((uint32_t)moe__f32_to_bf16(v1) << 16);
}
__device__ __forceinline__ void moe__fq_epi_relu2_2(const moe__fq_gemm_args &a, uint16_t *orow, const float *bias,
                                                    int n, float v0, float v1, float ts, float c1) {
    v0 *= ts;
    v1 *= ts;
    if (a.llama4) {
        v0 *= c1;
        v1 *= c1;
    }
    if (bias) {
        v0 += bias[n];
        v1 += bias[n + 1];
    }
    v0 = moe__fm_act(MOE_ACT_RELU2, v0, 0.0f, 0, 0, 0);
    v1 = moe__fm_act(MOE_ACT_RELU2, v1, 0.0f, 0, 0, 0);
    *(uint32_t *)(orow + n) = (uint32_t)moe__f32_to_bf16(v0) | ((uint32_t)moe__f32_to_bf16(v1) << 16);
}
__device__ __forceinline__ void moe__fq_epi_down2(float *yrow, const float *bias, int n, float v0, float v1, float ts,
                                                  float wt) {
    v0 *= ts;
    v1 *= ts;
    if (bias) {
        v0 += bias[n];
        v1 += bias[n + 1];
    }
    *(float2 *)(yrow + n) = make_float2(v0 * wt, v1 * wt);
}

/* Four e4m3 codes (bytes of w) -> two f16x2 words (bytes 0, 1 -> lo; 2, 3 -> hi), exactly: every
 * e4m3 value is an f16 (shared by the GEMV, register-operand and Hopper kernels). */
static __device__ __forceinline__ void moe__fq_e4m3x4_f16(uint32_t w, uint32_t &lo, uint32_t &hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
#else
    /* code c -> f16 bits (c & 0x80) << 8 | (c & 0x7F) << 7, which read as the value / 256
     * (normals and subnormals alike); one exact multiply by 256 (the NaN code gives 480) */
    const uint32_t l = (w & 0xFFu) | ((w & 0xFF00u) << 8), h = ((w >> 16) & 0xFFu) | ((w >> 8) & 0xFF0000u);
    const uint32_t fl = ((l & 0x00800080u) << 8) | ((l & 0x007F007Fu) << 7);
    const uint32_t fh = ((h & 0x00800080u) << 8) | ((h & 0x007F007Fu) << 7);
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(lo) : "r"(fl), "r"(0x5C005C00u));
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(hi) : "r"(fh), "r"(0x5C005C00u));
#endif
}

/* 4-bit widening shared by the Hopper kernels (fused_qgmma.cu) and the register-operand tile
 * kernel (fused_quant.cu). */
/* Eight packed 4-bit codes (element i = nibble i, low nibble first) -> eight bf16 in o (x: elements
 * 0-1, ..., w: 6-7), exactly.  Nibbles i and i + 4 are spread into the two halves of a word
 * ((w >> 4i) & 0x000F000F) and placed with one multiply:
 *   e2m1 (E2M1): magnitude bits at bf16 bits 6-8 and the sign at bit 15 (t * 0x1040, masked) read
 *     as e2m1 x 2^-126 (code 1, 0.5, lands on the bf16 subnormal 2^-127), times 2^126, times the
 *     scale s2 (bf16x2; e2m1 x e4m3 and e2m1 x 2^k are exact in bf16);
 *   int4: (nibble ^ 8) in the low bits of bf16 128 (= 128 + n + 8), minus 136.
 * moe__fq_w4x8_pairs leaves the pairs as they come: r[i] = (element i, element i + 4) (low half
 * first); moe__fq_w4x8_bf16 puts them back in order with four byte permutes. */
/* FOLD (MOE__FQ_F4S, k_qg_rs): s2 is the scale x 2^126 already (mxfp4's 2^(k - 1), a bf16 for
 * k <= 128), so one multiply takes the placed bits to e2m1 x scale, exact down to bf16's subnormals. */
template <bool E2M1, bool FOLD = false>
static __device__ __forceinline__ void moe__fq_w4x8_pairs(uint32_t w, uint32_t s2, uint32_t (&r)[4]) {
    if (!E2M1) w ^= 0x88888888u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t t = (w >> (4 * j)) & 0x000F000Fu;
        if (E2M1) {
            const uint32_t b = (t * 0x1040u) & 0x81C081C0u;
            uint32_t m = b;
            if (!FOLD) asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(m) : "r"(b), "r"(0x7E807E80u), "r"(0x80008000u));
            asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r[j]) : "r"(m), "r"(s2), "r"(0x80008000u));
        } else {
            asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r[j]) : "r"(t | 0x43004300u), "r"(0x3F803F80u), "r"(0xC308C308u));
        }
    }
}
template <bool E2M1>
static __device__ __forceinline__ uint4 moe__fq_w4x8_bf16(uint32_t w, uint32_t s2) {
    uint32_t r[4];
    moe__fq_w4x8_pairs<E2M1>(w, s2, r);
    uint4 o;
    o.x = __byte_perm(r[0], r[1], 0x5410);
    o.y = __byte_perm(r[2], r[3], 0x5410);
    o.z = __byte_perm(r[0], r[1], 0x7632);
    o.w = __byte_perm(r[2], r[3], 0x7632);
    return o;
}

/* nvfp4 on f16 MMAs (k_qg_rs): eight packed e2m1 codes -> four f16x2 pairs r[i] = (element i,
 * element i + 4) x 2^-6 x the f16x2 scale s2, exactly.  Each nibble (sign, then e1 e0 m) becomes
 * the e4m3 byte sign << 7 | e1 e0 m << 2, whose value is the e2m1 value x 2^-6 (subnormal code
 * 0.5 too), and two such bytes become an f16x2 in one conversion; e2m1 x e4m3 x 2^-6 is exact in
 * f16 (at least 2^-16, at most 42).  The byte permute first puts elements i and i + 4 into the
 * two bytes each conversion takes.  16 instructions a word against 24 for the bf16 pairs. */
static __device__ __forceinline__ void moe__fq_e2m1x8_f16(uint32_t w, uint32_t s2, uint32_t (&r)[4]) {
    const uint32_t v = __byte_perm(w, 0, 0x3120); /* bytes 0, 2, 1, 3: elements (0 1) (4 5) (2 3) (6 7) */
    const uint32_t lo = ((v << 4) & 0x80808080u) | ((v << 2) & 0x1C1C1C1Cu); /* elements 0, 4, 2, 6 */
    const uint32_t hi = (v & 0x80808080u) | ((v >> 2) & 0x1C1C1C1Cu);        /* elements 1, 5, 3, 7 */
    uint32_t h[4];
    asm("{\n.reg .b16 a, b, c, d;\nmov.b32 {a, b}, %4;\nmov.b32 {c, d}, %5;\n"
        "cvt.rn.f16x2.e4m3x2 %0, a;\ncvt.rn.f16x2.e4m3x2 %1, c;\ncvt.rn.f16x2.e4m3x2 %2, b;\ncvt.rn.f16x2.e4m3x2 %3, d;\n}\n"
        : "=r"(h[0]), "=r"(h[1]), "=r"(h[2]), "=r"(h[3])
        : "r"(lo), "r"(hi));
#pragma unroll
    for (int j = 0; j < 4; j++) asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r[j]) : "r"(h[j]), "r"(s2));
}

/* Eight packed int4 codes -> four f16x2 pairs r[i] = (element i, element i + 4) x the f16x2 scale
 * s2 (MOE__FQ_I4F), exactly: (nibble ^ 8) in the low bits of f16 1024 (= 1024 + n + 8), minus 1032
 * (= n), times s2 (exact where moe__cuda_i4_fold allowed the fold). */
static __device__ __forceinline__ void moe__fq_i4x8_f16(uint32_t w, uint32_t s2, uint32_t (&r)[4]) {
    w ^= 0x88888888u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        /* mask and exponent in one lop3 ((a & b) | c); written as C, ptxas made two */
        uint32_t t;
        asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(t) : "r"(w >> (4 * j)), "n"(0x000F000F), "n"(0x64006400));
        uint32_t n;
        asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(n) : "r"(t), "r"(0x3C003C00u), "r"(0xE408E408u));
        asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r[j]) : "r"(n), "r"(s2));
    }
}
/* f16x2 (s', s') of a bf16 weight scale (bits) times fold = 2^b: exact where the fold is allowed. */
static __device__ __forceinline__ uint32_t moe__fq_i4_scale2(uint32_t bits, float fold) {
    /* (an integer exponent shift instead of FMUL + F2F measured 3-5% slower, fifteenth session) */
    const uint32_t u = __half_as_ushort(__float2half_rn(__uint_as_float(bits << 16) * fold));
    return u | (u << 16);
}

/* bf16x2 (s, s) of a scale code: nvfp4 e4m3, mxfp4 ue8m0 (2^(k - 127); k = 0 the subnormal
 * 2^-127, 255 NaN); others 1. */
template <int MODE> static __device__ __forceinline__ uint32_t moe__fq_scale2(uint32_t code) {
    uint32_t b = 0x3F80u;
    if (MODE == MOE_QUANT_NVFP4) {
        const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)code, __NV_E4M3);
        b = __float_as_uint(__half2float(__half(h))) >> 16; /* exact: 4 significant bits */
    } else if (MODE == MOE_QUANT_MXFP4) {
        b = code == 0 ? 0x40u : code == 255 ? 0x7FC0u : code << 7;
    }
    return b | (b << 16);
}

/* Average pairs per local expert at which the quantised path moves from the register-operand
 * tile kernel (fused_quant.cu's k_wreg, below) to the Hopper wgmma kernels (fused_qgmma.cu, from
 * there): 48 for fp8 / fp8_block, 64 for the 4-bit modes (H100 measurements in
 * moe__fq_qgmma_use); the environment variable `name` (MOE_FUSED_QWREG, MOE_FUSED_QWGMMA), when
 * a whole non-negative integer, replaces it ("0": the kernel never runs). */
static inline long moe__fq_pairs_bound(const char *name, int mode) {
    long bound = mode == MOE_QUANT_FP8 || mode == MOE_QUANT_FP8_BLOCK ? 48 : 64;
    const char *env = getenv(name);
    if (env && env[0]) {
        char *end = nullptr;
        const long v = strtol(env, &end, 10);
        if (end && *end == '\0' && v >= 0) bound = v;
    }
    return bound;
}

/* Hopper wgmma GEMMs, every mode (fused_qgmma.cu).  moe__fq_qgmma_use: whether a call with P
 * pairs over lc local experts takes them (sm_90a, H and I multiples of 128, at least
 * MOE_FUSED_QWGMMA (default 48 for fp8 / fp8_block, 64 for the 4-bit modes) pairs per local
 * expert on average; "0": never); the
 * row tiles must then be 128 rows.  moe__fq_qgmma: one GEMM (g1: GEMM1, after permuting x's rows
 * as 16-bit values into xp, P x Kd x 2 bytes), grid from the tile bound max_tiles. */
bool moe__fq_qgmma_use(int mode, int64_t P, int lc, int64_t H, int64_t I);
/* Whether moe__fq_qgmma's GEMM2 quantises the intermediate itself (fp8_block on k_qg_exact or
 * k_qg_rs, nvfp4 on k_qg_rs: quantised and widened in one pass), so the caller must not; H the
 * hidden size. */
bool moe__fq_qgmma_quantises_inter(int mode, int64_t H);
/* Whether moe__fq_qgmma runs the register-operand kernel k_qg_rs for `mode` at hidden size H
 * (the 4-bit modes and fp8 unless MOE_FUSED_QRS=0, fp8_block from H = 4096 or with
 * MOE_FUSED_QRS=1; path MOE_FUSED_PATH_WGMMA_RS). */
bool moe__fq_qgmma_rs(int mode, int64_t H);
moe_status moe__fq_qgmma(cudaStream_t st, int dev, int mode, bool g1, const moe__fq_gemm_args &a, int64_t P,
                         int64_t max_tiles, void *xp);
/* MOE__FQ_I4F: rs[t] = 2^-a of x's row t (bf16 [T, H]), the power of two each row's f16 copy is
 * multiplied by (fused_qgmma.cu) */
moe_status moe__fq_i4_xrows(cudaStream_t st, int dev, const uint16_t *x, int64_t T, int H, float *rs);

/* The 16-bit A operand of one GEMM (for k_qg_exact and fused_quant.cu's k_wreg), rows in the
 * tile table's order: GEMM1 x's rows permuted into xp (fp8 / fp8_block: e4m3 codes as f16; nvfp4:
 * e2m1 x scale as bf16; mx modes: x), GEMM2 the intermediate's region (fp8 / nvfp4 codes widened
 * over it; fp8_block: quantised and widened in one pass, scales into a.A_scales; mx modes: as it
 * is).  *out: the rows. */
moe_status moe__fq_a16(cudaStream_t st, int dev, int mode, bool g1, const moe__fq_gemm_args &a, int64_t P, void *xp,
                       const uint4 **out, bool rs = false);

bool moe__fq_gemv_eligible(const moe__fused_args *A);
/* ... and whether its GEMM1 kernel then routes its own pair (path MOE_FUSED_PATH_GEMV_ROUTE): 0 no;
 * 1 yes, after the routing kernel; 2 yes, and no routing kernel runs (A->route_pending: the decode
 * kernels write ids, weights and replay).  moe__fq_gemv's route_in. */
int moe__fq_gemv_routes(const moe__fused_args *A, int dev);
/* route.cu: the backend's routing slot (arguments validated) */
extern "C" moe_status moe__cuda_route(const moe_route_cfg *cfg, const moe_tensor *logits, const moe_tensor *bias,
                                      moe_tensor *ids, moe_tensor *weights, moe_tensor *replay);
moe_status moe__fq_gemv(const moe__cuda_guard &g, const moe__fused_args *A, int route_in, bool bulk);
/* Whether that call's k_qv_down takes its weight rows by bulk copies (fused_qgemv.cu, qv_dn_bulk). */
bool moe__fq_gemv_bulk(const moe__fused_args *A, int route_in);

#endif
