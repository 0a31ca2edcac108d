/* fused_quant.cuh -- shared by the quantised fused MoE's tile kernels (fused_quant.cu) and
 * its decode GEMV path (fused_qgemv.cu): the layout of the workspace region of the quantised
 * path and the GEMV path's entry points. */
#ifndef MOE_FUSED_QUANT_CUH
#define MOE_FUSED_QUANT_CUH

#include "cuda_common.cuh"
#include "fused_quant.h"
#include "fused_moe.cuh" /* moe__fm_act */

/* Byte offsets into the workspace buffer of the regions moe__fused_quant_ws_bytes sizes,
 * computed from the workspace's own max_tokens, top_k, E, H and I (each region 256-aligned):
 *   misc   +0 ntiles (i32); +16 x's per-tensor scale (fp8) or global scale (nvfp4), f32;
 *          +32 the intermediate's; +64 the GEMV path's counters (MOE__FQ_NCTR u32: x chunks
 *          claimed, x chunks done, intermediate chunks claimed, done, intermediate amax bits);
 *   tiles  tile table: expert, first row, rows (wtiles i32 each);
 *   xc/xs  x codes [max_tokens, H] and scales; gc/gs the intermediate's [max_pairs, I]. */
#define MOE__FQ_CTR_OFF 64
#define MOE__FQ_NCTR 5
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
    float *y;                  /* G2 output f32 [P, N] (pair rows) */
};

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
    const float v0 = moe__fm_act(a.act, g0, u0, a.alpha, a.beta, a.limit);
    const float v1 = moe__fm_act(a.act, g1, u1, a.alpha, a.beta, a.limit);
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

/* Hopper wgmma GEMMs, every mode (fused_qgmma.cu).  moe__fq_qgmma_use: whether a call with P
 * pairs over lc local experts takes them (sm_90a, H and I multiples of 128, at least
 * MOE_FUSED_QWGMMA (default 32; mxint4 64) pairs per local expert on average; "0": never); the
 * row tiles must then be 128 rows.  moe__fq_qgmma: one GEMM (g1: GEMM1, after permuting x's rows
 * as 16-bit values into xp, P x Kd x 2 bytes), grid from the tile bound max_tiles. */
bool moe__fq_qgmma_use(int mode, int64_t P, int lc, int64_t H, int64_t I);
/* Whether moe__fq_qgmma's GEMM2 quantises the intermediate itself (fp8_block on the exact
 * kernel: quantised and widened in one pass), so the caller must not. */
bool moe__fq_qgmma_quantises_inter(int mode);
moe_status moe__fq_qgmma(cudaStream_t st, int dev, int mode, bool g1, const moe__fq_gemm_args &a, int64_t P,
                         int64_t max_tiles, void *xp);

bool moe__fq_gemv_eligible(const moe__fused_args *A);
moe_status moe__fq_gemv(const moe__cuda_guard &g, const moe__fused_args *A);

#endif
