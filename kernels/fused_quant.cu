/* fused_quant.cu -- the fused MoE in the quantisation modes on CUDA (fp8, fp8_block, nvfp4,
 * mxfp4, mxint4), matching the CPU reference (engine/src/cpu/fused_quant_cpu.c) up to f32
 * accumulation order.  Numerics: docs/quantization.md, "Fused MoE per mode".
 *
 * One call = routing (moe_route, by the core) + on the moelab stream, no allocation and no
 * host synchronisation (graph-capturable; grids are upper bounds from T):
 *   1. fp8 / fp8_block / nvfp4: the GEMM1 input x quantised by moe__cuda_quantize into the
 *      workspace (fp8: amax over T x H; fp8_block: per (token, 128); nvfp4: global + per 16);
 *      nvfp4 on k_qg_rs instead: x's amax by the align launch's other blocks, then x quantised
 *      once a token and scattered to its pairs' rows by k_qr_nvfp4_x (fused_qgmma.cu) before GEMM1;
 *   2. moe__k_fm_align (fused_moe.cu; one block): local pairs per expert, tile table, expert-sorted pair order;
 *   3. k_gemm<G1>: grouped GEMM over experts; the weights' codes (e4m3, e2m1, int4 nibbles)
 *      and, for W8A8/W4A4, the activations' codes are read from global memory and turned
 *      into bf16 in registers on their way into shared memory -- e4m3 values, e2m1 x e4m3
 *      products (nvfp4) and e2m1 x 2^k (mxfp4) are exact in bf16, int4 values too -- so
 *      `mma.sync.m16n8k16` bf16 -> f32 multiplies exactly the codes; the scales that do not
 *      fold exactly are applied to f32 partial sums: per 128-column group (fp8_block: a_scale
 *      x w_scale), per 32-column group (mxint4: the bf16 weight scale), per tensor in the
 *      epilogue (fp8: sx x sw[e]; nvfp4: the two global scales).  No weight tensor is ever
 *      dequantised in memory.  Epilogue: llama4 weight, bias, activation, bf16 intermediate;
 *   4. fp8 / fp8_block / nvfp4: the intermediate quantised like x (per-tensor modes zero it
 *      first so rows past the local pairs do not enter the amax);
 *   5. k_gemm<G2>: intermediate x W2^T, bias and routing weight, f32 rows per pair;
 *   6. moe__k_fm_finalize (fused_moe.cu): out[t] = bf16(sum over local k, in order).
 * mxint4 on k_wreg and the Hopper k_qg_rs runs as MOE__FQ_I4F where its scales allow (f16 MMAs,
 * the scale folded into exact f16 weights, activation rows times powers of two; fused_quant.cuh).
 * Below 48 pairs per local expert (4-bit: 64; fq_wreg_use) steps 3 and 5 run as k_wreg, whose
 * weight operands go from global memory to registers (no shared-memory tile); on sm_90a from
 * there (moe__fq_qgmma_use) as
 * the warp-specialised wgmma kernels of fused_qgmma.cu instead (128-row tiles; fp8_block's step 4,
 * and nvfp4's on k_qg_rs, moves into its GEMM2 launch, quantising and widening the intermediate
 * in one pass).
 * Tiles (per call, from the average rows per local expert): small 16 x 64 x 128 (decode: 64
 * fp8 / 32 fp4 weight bytes per thread in flight), medium 64 x 64 x 128, large 128 x 128 x 64
 * (8 warps); one shared stage, the next step's codes prefetched into registers while the
 * current one multiplies.  Gated GEMM1 tiles interleave gate and up rows by 8 (no repacking: the tile's
 * row map does it), so the activation runs on the accumulators. */
#include "cuda_common.cuh"
#include "fused_moe.cuh"
#include "fused_quant.cuh"
#include "quant_math.h"

#include <stdlib.h>
#include <string.h>

#define FN "moe_fused_moe"

namespace {

/* -------------------------------------------------------------- GEMM -- */

/* the GEMM arguments: moe__fq_gemm_args (fused_quant.cuh, shared with fused_qgmma.cu) */
using gemm_args = moe__fq_gemm_args;

/* Raw codes of one 16-element chunk of one row, kept in registers between the global load
 * and the conversion. */
struct raw16 {
    uint4 v[2]; /* bf16: 32 bytes; e4m3: v[0]; packed nibbles: v[0].x, v[0].y */
    uint32_t sc; /* scale code (e4m3 / ue8m0 byte) */
    float fs;    /* f32 group scale (fp8_block, mxint4) */
};

__device__ __forceinline__ uint32_t fq_pack2(float a, float b) {
    /* exact values: the bf16 bits are the f32's top half */
    return (__float_as_uint(a) >> 16) | (__float_as_uint(b) & 0xFFFF0000u);
}

/* Four e4m3 codes (one word, byte i = element i) -> two bf16x2 words, exactly: the code's 7
 * magnitude bits placed at bf16 bit 4 read as 2^(E-127) (1 + M/8) (or the subnormal
 * (M/8) 2^-126 when E = 0), times 2^120 = the e4m3 value; the sign bit is or-ed back.  (The
 * e4m3 NaN code 0x7F becomes 480: only NaN inputs produce it.) */
__device__ __forceinline__ void fq_e4m3x4(uint32_t w, uint32_t &lo, uint32_t &hi) {
    const uint32_t xl = ((w & 0x7Fu) << 4) | ((w & 0x7F00u) << 12);
    const uint32_t sl = ((w & 0x80u) << 8) | ((w & 0x8000u) << 16);
    const uint32_t xh = ((w >> 12) & 0x7F0u) | ((w >> 4) & 0x07F00000u);
    const uint32_t sh = ((w >> 8) & 0x8000u) | (w & 0x80000000u);
    uint32_t ml, mh;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(ml) : "r"(xl), "r"(0x7B807B80u), "r"(0u));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(mh) : "r"(xh), "r"(0x7B807B80u), "r"(0u));
    lo = ml | sl;
    hi = mh | sh;
}

/* 16 codes -> 16 bf16 in dst (two 16-byte shared stores). */
template <int MODE>
__device__ __forceinline__ void fq_convert(const raw16 &r, bool bf16_src, const float *lut8, const float *lut4,
                                           uint16_t *dst) {
    uint4 o0, o1;
    if (bf16_src) {
        o0 = r.v[0];
        o1 = r.v[1];
    } else if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK) {
        uint32_t w[4] = {r.v[0].x, r.v[0].y, r.v[0].z, r.v[0].w};
        uint32_t o[8];
#pragma unroll
        for (int i = 0; i < 4; i++) fq_e4m3x4(w[i], o[2 * i], o[2 * i + 1]);
        o0 = make_uint4(o[0], o[1], o[2], o[3]);
        o1 = make_uint4(o[4], o[5], o[6], o[7]);
    } else {
        float s;
        if (MODE == MOE_QUANT_NVFP4) s = lut8[r.sc & 0xFF];
        else if (MODE == MOE_QUANT_MXFP4) s = moe__ue8m0_to_f32((uint8_t)r.sc);
        else s = 1.0f; /* mxint4: the scale is applied per 32-column group */
        uint32_t w[2] = {r.v[0].x, r.v[0].y};
        uint32_t o[8];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t b = (w[i] >> (8 * j)) & 0xFF;
                float lo, hi;
                if (MODE == MOE_QUANT_MXINT4) {
                    lo = (float)((int)((b & 0xF) ^ 8) - 8);
                    hi = (float)((int)((b >> 4) ^ 8) - 8);
                } else {
                    lo = lut4[b & 0xF] * s;
                    hi = lut4[b >> 4] * s;
                }
                o[i * 4 + j] = fq_pack2(lo, hi);
            }
        o0 = make_uint4(o[0], o[1], o[2], o[3]);
        o1 = make_uint4(o[4], o[5], o[6], o[7]);
    }
    *(uint4 *)dst = o0;
    *(uint4 *)(dst + 8) = o1;
}

/* The row map of a row tile (first row r0, nr rows) of a grouped GEMM, by the NT threads of the
 * CTA: rowpair[r] its pair, rowsrc[r] the row of its A operand (GEMM1: the pair's token; GEMM2:
 * the sorted row); -1 past nr. */
template <bool G1, int BM, int NT>
__device__ __forceinline__ void fq_row_map(const gemm_args &a, int r0, int nr, int *rowpair, int *rowsrc) {
    for (int r = threadIdx.x; r < BM; r += NT) {
        if (r < nr) {
            const int p = a.sorted[r0 + r];
            rowpair[r] = p;
            rowsrc[r] = G1 ? p / a.K : r0 + r;
        } else {
            rowpair[r] = -1;
            rowsrc[r] = -1;
        }
    }
}

/* Grouped GEMM tile BM x BN x BK, WM x WN warps.  Shared tiles are bf16 rows of BK + 8
 * (the pad spreads ldmatrix rows over the banks), one stage: each thread owns CA chunks of A
 * and CB of B (16 consecutive K elements of one row each), loads the next step's codes into
 * registers before multiplying the current step, and converts and stores them after it (the
 * register set is the second stage).
 * Gated GEMM1 tiles hold BN/2 gate and BN/2 up rows interleaved by 8 (tile row 16g + r is
 * gate row 8g + r for r < 8, up row 8g + r - 8 otherwise), so each thread's accumulators
 * hold matching gate and up columns and the activation runs on registers. */
template <int MODE, int BM, int BN, int BK, int WM, int WN, bool G1>
__global__ void __launch_bounds__(WM *WN * 32) k_gemm(const gemm_args a) {
    constexpr int NT = WM * WN * 32, SROW = BK + 8;
    constexpr int WTM = BM / WM, WTN = BN / WN, MI = WTM / 16, NI = WTN / 8;
    constexpr int CPR = BK / 16;                                  /* chunks per row */
    constexpr int CB = BN * CPR / NT, CA = (BM * CPR + NT - 1) / NT;
    static_assert(NI % 2 == 0 && MI >= 1 && CB >= 1 && (BN * CPR) % NT == 0, "tile");
    /* K groups whose scale does not fold into bf16 exactly */
    constexpr int GCOLS = MODE == MOE_QUANT_FP8_BLOCK ? 128 : (MODE == MOE_QUANT_MXINT4 ? 32 : 0);
    constexpr int GDIV = GCOLS ? GCOLS : 1;
    constexpr int GSPAN = (GCOLS && GCOLS < BK) ? GCOLS : BK;       /* columns per scale slot */
    constexpr int SG = BK / GSPAN;                                  /* scale groups per step */
    constexpr bool A_BF16 = MODE == MOE_QUANT_MXFP4 || MODE == MOE_QUANT_MXINT4;
    constexpr bool PACKED = MODE == MOE_QUANT_NVFP4 || MODE == MOE_QUANT_MXFP4 || MODE == MOE_QUANT_MXINT4;
    __shared__ __align__(16) uint16_t As[BM * SROW];
    __shared__ __align__(16) uint16_t Bs[BN * SROW];
    __shared__ float sA[BM][SG], sB[BN][SG];
    __shared__ float lut8[256], lut4[16];
    __shared__ int rowsrc[BM], rowpair[BM];

    const int ntn = a.N / BN;
    const int tile = blockIdx.x / ntn, nb = blockIdx.x % ntn;
    if (tile >= *a.ntiles) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    for (int i = tid; i < 256; i += NT) lut8[i] = moe__e4m3_to_f32((uint8_t)i);
    if (tid < 16) lut4[tid] = moe__e2m1_to_f32((uint8_t)tid);
    const int le = a.tile_e[tile], r0 = a.tile_r0[tile], nr = a.tile_n[tile];
    const int64_t e = (int64_t)a.lo + le;
    fq_row_map<G1, BM, NT>(a, r0, nr, rowpair, rowsrc);
    __syncthreads();
    const bool gated = G1 && a.gated;
    const int KT = a.Kd / BK;

    /* per-chunk slots: (row, column) */
    int b_row[CB], b_col[CB];
    int64_t b_w[CB], b_lrow[CB];
#pragma unroll
    for (int i = 0; i < CB; i++) {
        const int c = tid + i * NT;
        b_row[i] = c / CPR;
        b_col[i] = (c % CPR) * 16;
        const int j = b_row[i];
        int64_t wr;
        if (gated) wr = (j & 8) ? (int64_t)a.I + (int64_t)nb * (BN / 2) + (j >> 4) * 8 + (j & 7)
                                : (int64_t)nb * (BN / 2) + (j >> 4) * 8 + (j & 7);
        else wr = (int64_t)nb * BN + j;
        b_lrow[i] = wr;
        b_w[i] = e * a.N + wr;
    }
    int a_row[CA], a_col[CA], a_src[CA];
#pragma unroll
    for (int i = 0; i < CA; i++) {
        const int c = tid + i * NT;
        a_row[i] = c < BM * CPR ? c / CPR : -1;
        a_col[i] = (c % CPR) * 16;
        a_src[i] = a_row[i] >= 0 ? rowsrc[a_row[i]] : -1;
    }

    raw16 ra[CA], rb[CB];
    auto load = [&](int kt) {
#pragma unroll
        for (int i = 0; i < CB; i++) {
            const int k = kt * BK + b_col[i];
            const int64_t wb = b_w[i];
            if (PACKED) {
                const uint2 v = *(const uint2 *)(a.W + (wb * a.Kd + k) / 2);
                rb[i].v[0] = make_uint4(v.x, v.y, 0, 0);
                if (MODE == MOE_QUANT_NVFP4) rb[i].sc = ((const uint8_t *)a.W_scales)[wb * (a.Kd / 16) + k / 16];
                else if (MODE == MOE_QUANT_MXFP4) rb[i].sc = ((const uint8_t *)a.W_scales)[wb * (a.Kd / 32) + k / 32];
                else rb[i].fs = moe__bf16_to_f32(((const uint16_t *)a.W_scales)[wb * (a.Kd / 32) + k / 32]);
            } else {
                rb[i].v[0] = *(const uint4 *)(a.W + wb * a.Kd + k);
                if (MODE == MOE_QUANT_FP8_BLOCK)
                    rb[i].fs = ((const float *)a.W_scales)[(e * (a.N / 128) + b_lrow[i] / 128) * (a.Kd / 128) + k / 128];
            }
        }
#pragma unroll
        for (int i = 0; i < CA; i++) {
            if (a_row[i] < 0) continue;
            const int k = kt * BK + a_col[i];
            const int src = a_src[i];
            if (src < 0) {
                ra[i].fs = 0.0f;
            } else if (A_BF16) {
                const uint4 *g = (const uint4 *)(a.A_bf16 + (int64_t)src * a.Kd + k);
                ra[i].v[0] = g[0];
                ra[i].v[1] = g[1];
            } else if (PACKED) {
                const uint2 v = *(const uint2 *)(a.A_codes + ((int64_t)src * a.Kd + k) / 2);
                ra[i].v[0] = make_uint4(v.x, v.y, 0, 0);
                ra[i].sc = ((const uint8_t *)a.A_scales)[(int64_t)src * (a.Kd / 16) + k / 16];
            } else {
                ra[i].v[0] = *(const uint4 *)(a.A_codes + (int64_t)src * a.Kd + k);
                if (MODE == MOE_QUANT_FP8_BLOCK)
                    ra[i].fs = ((const float *)a.A_scales)[(int64_t)src * (a.Kd / 128) + k / 128];
            }
        }
    };
    auto store = [&]() {
#pragma unroll
        for (int i = 0; i < CB; i++) {
            fq_convert<MODE>(rb[i], false, lut8, lut4, &Bs[b_row[i] * SROW + b_col[i]]);
            if (GCOLS && b_col[i] % GSPAN == 0) sB[b_row[i]][b_col[i] / GSPAN] = rb[i].fs;
        }
#pragma unroll
        for (int i = 0; i < CA; i++) {
            if (a_row[i] < 0) continue;
            uint16_t *d = &As[a_row[i] * SROW + a_col[i]];
            if (a_src[i] < 0) {
                *(uint4 *)d = make_uint4(0, 0, 0, 0);
                *(uint4 *)(d + 8) = make_uint4(0, 0, 0, 0);
            } else {
                fq_convert<MODE>(ra[i], A_BF16, lut8, lut4, d);
            }
            if (MODE == MOE_QUANT_FP8_BLOCK && a_col[i] % GSPAN == 0) sA[a_row[i]][a_col[i] / GSPAN] = ra[i].fs;
        }
    };

    float acc[MI][NI][4], part[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = part[i][j][q] = 0.0f;
#pragma unroll
    for (int i = 0; i < CB; i++) {
        rb[i].fs = 1.0f;
        rb[i].sc = 0;
    }
#pragma unroll
    for (int i = 0; i < CA; i++) {
        ra[i].fs = 1.0f;
        ra[i].sc = 0;
    }

    load(0);
    store();
    __syncthreads();
    for (int kt = 0; kt < KT; kt++) {
        if (kt + 1 < KT) load(kt + 1);
        const uint16_t *as = As, *bs = Bs;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
            uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const int row = wm * WTM + mi * 16 + (lane & 15), col = ks * 16 + (lane >> 4) * 8;
                moe__fm_ldsm4(af[mi], moe__fm_smem(as + row * SROW + col));
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; nj++) {
                const int q = lane >> 3;
                const int row = wn * WTN + nj * 16 + (q >> 1) * 8 + (lane & 7), col = ks * 16 + (q & 1) * 8;
                uint32_t r[4];
                moe__fm_ldsm4(r, moe__fm_smem(bs + row * SROW + col));
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int ni = 0; ni < NI; ni++) {
                    if (GCOLS) moe__fm_mma(part[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
                    else moe__fm_mma(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
                }
            /* end of a scale group: acc += part * scale(row, col) */
            if (GCOLS && ((ks + 1) * 16) % GSPAN == 0 && (GCOLS <= BK || ((kt + 1) * BK) % GDIV == 0)) {
                const int sg = (ks * 16) / GSPAN;
#pragma unroll
                for (int mi = 0; mi < MI; mi++)
#pragma unroll
                    for (int ni = 0; ni < NI; ni++)
#pragma unroll
                        for (int q = 0; q < 4; q++) {
                            const int r = wm * WTM + mi * 16 + (lane >> 2) + (q >> 1) * 8;
                            const int c = wn * WTN + ni * 8 + (lane & 3) * 2 + (q & 1);
                            const float s = MODE == MOE_QUANT_FP8_BLOCK ? sA[r][sg] * sB[c][sg] : sB[c][sg];
                            acc[mi][ni][q] += part[mi][ni][q] * s;
                            part[mi][ni][q] = 0.0f;
                        }
            }
        }
        if (kt + 1 < KT) {
            __syncthreads(); /* everyone is done with this step's tiles */
            store();
        }
        __syncthreads();
    }

    /* epilogue, from registers */
    float ts = 1.0f;
    if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4) ts = a.A_tensor[0] * a.W_tensor[e];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int r = wm * WTM + mi * 16 + (lane >> 2) + hf * 8;
            if (r >= nr) continue;
            const int p = rowpair[r];
            const int c2 = (lane & 3) * 2;
            const float *bias = a.bias ? a.bias + e * a.N : nullptr;
            if (G1) {
                const float c1 = a.llama4 ? a.wts[p] : 1.0f;
                uint16_t *orow = a.inter + (int64_t)(r0 + r) * a.I;
                if (gated) {
                    moe__fm_act_at(a.act, [&](auto ak) {
#pragma unroll
                        for (int nj = 0; nj < NI / 2; nj++) {
                            /* blocks 2nj (gate) and 2nj+1 (up) cover intermediate columns ng .. ng+7 */
                            const int ng = nb * (BN / 2) + ((wn * WTN + nj * 16) >> 4) * 8 + c2;
                            moe__fq_epi_gated2<decltype(ak)::v>(
                                a, orow, bias, ng, acc[mi][2 * nj][hf * 2], acc[mi][2 * nj][hf * 2 + 1],
                                acc[mi][2 * nj + 1][hf * 2], acc[mi][2 * nj + 1][hf * 2 + 1], ts, c1);
                        }
                    });
                } else {
#pragma unroll
                    for (int ni = 0; ni < NI; ni++)
                        moe__fq_epi_relu2_2(a, orow, bias, nb * BN + wn * WTN + ni * 8 + c2, acc[mi][ni][hf * 2],
                                            acc[mi][ni][hf * 2 + 1], ts, c1);
                }
            } else {
                const float w = a.llama4 ? 1.0f : a.wts[p];
                float *yrow = a.y + (int64_t)p * a.N;
#pragma unroll
                for (int ni = 0; ni < NI; ni++)
                    moe__fq_epi_down2(yrow, bias, nb * BN + wn * WTN + ni * 8 + c2, acc[mi][ni][hf * 2],
                                      acc[mi][ni][hf * 2 + 1], ts, w);
            }
        }
}

/* ------------------------------------------- register-operand tile kernel -- */

/* k_wreg: the grouped GEMMs of every mode below moe__fq_pairs_bound pairs per local expert, where
 * k_gemm's tiles were bound by shared-memory traffic (Nsight Compute, H100, Mixtral 8x7B T = 64:
 * L1 93-98% busy, DRAM 16-59%).  Tile WR_BM rows x 128 weight rows (gated
 * GEMM1: 64 gate + their 64 up rows), 4 warps of 32 weight rows, K in chunks of 128.
 * The weights never pass through shared memory: thread (g, t) of a warp loads, one chunk ahead,
 * the 32 codes 32t .. 32t + 31 of the chunk of weight row g of each of its four 8-row blocks
 * (fp8: 32 bytes, 4-bit: 16) and widens them in registers into mma.sync's B fragments, whose k
 * slots are 2t, 2t + 1, 2t + 8, 2t + 9 of each MMA step j:
 *   fp8 modes: the codes 32t + 4j + i (i = 0..3) in slots 2t + (i & 1) + 8 (i >> 1) (cvt.rn.f16x2.e4m3x2
 *     gives the pairs (0, 1), (2, 3));
 *   4-bit: code n of byte-word m (element 32t + 8m + n) in step 2m + ((n >> 1) & 1), slot 2t + (n >> 2)
 *     + 8 (n & 1) (moe__fq_w4x8_pairs gives the pairs (n, n + 4) unpermuted).
 *   mxint4 (its scale on per-32 partial sums needs every MMA step inside one group): byte-word m
 *     is group m's bytes 16m + 4t, from the lane's 16 bytes 16t .. 16t + 15 by a 4 x 4 word
 *     transpose over the row's four lanes.
 * The activations (fp8 modes: their codes, widened while staging; 4-bit: 16-bit rows from
 * moe__fq_a16, widened once before the GEMM, not once per column tile) are staged in shared
 * memory (two buffers, one barrier a chunk) with the same permutation of each chunk's columns,
 * so every product pairs the same k.  Gated GEMM1: a
 * warp's blocks are gate, up, gate, up of the same 16 intermediate columns, so the activation
 * runs on the accumulators.  Numerics as k_gemm's: exact 16-bit values of the codes (fp8 modes:
 * f16 MMAs on e4m3 values; 4-bit: bf16 MMAs on e2m1 x its scale, int4), f32 sums, the scales that
 * do not fold on f32 partial sums (fp8_block: each chunk, one 128-column block; mxint4: each 32). */
constexpr int WR_BM = 32, WR_BN = 128, WR_NT = 128;

/* One step of k_wreg's 4 x 4 word transpose over a row's four lanes: swap (x0, x1) with lane
 * ^ m when first, else (y0, y1). */
__device__ __forceinline__ void wr_xchg(uint32_t &x0, uint32_t &x1, uint32_t &y0, uint32_t &y1, bool first, int m) {
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, first ? x0 : y0, m);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, first ? x1 : y1, m);
    if (first) {
        x0 = r0;
        x1 = r1;
    } else {
        y0 = r0;
        y1 = r1;
    }
}

/* acc += part x (f0, f1, f2, f3) element-wise, part = 0 (a scale group's promotion). */
__device__ __forceinline__ void wr_promote(float (&acc)[4], float (&part)[4], float f0, float f1, float f2, float f3) {
    acc[0] += part[0] * f0;
    acc[1] += part[1] * f1;
    acc[2] += part[2] * f2;
    acc[3] += part[3] * f3;
#pragma unroll
    for (int q = 0; q < 4; q++) part[q] = 0.0f;
}

template <bool F16>
__device__ __forceinline__ void wr_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if (F16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else moe__fm_mma(d, a, b0, b1);
}

template <int MODE, bool G1>
__global__ void __launch_bounds__(WR_NT, 3) k_wreg(const gemm_args a) {
    constexpr int BM = WR_BM, MI = BM / 16, NB = 4, KC = 128, SROW = KC + 8, NT = WR_NT;
    constexpr bool F16 = MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK; /* also: A as codes */
    constexpr bool BLOCK = MODE == MOE_QUANT_FP8_BLOCK, NV = MODE == MOE_QUANT_NVFP4;
    constexpr bool MX = MODE == MOE_QUANT_MXFP4, INT4 = MODE == MOE_QUANT_MXINT4, W4 = !F16;
    constexpr bool I4F = MODE == MOE__FQ_I4F, HM = F16 || I4F; /* HM: f16 MMAs */
    constexpr int WW = W4 ? 4 : 8;                         /* code words of a thread's row a chunk */
    constexpr int PIECES = BM * KC / 16, PT = PIECES / NT; /* 16-element activation pieces */
    static_assert(PIECES % NT == 0, "k_wreg tile");
    __shared__ __align__(16) uint16_t As[2][BM * SROW];
    __shared__ float sA[2][BM]; /* fp8_block: the rows' scales of the chunk */
    __shared__ int rowsrc[BM], rowpair[BM];

    const bool gated = G1 && a.gated;
    const int ntn = gated ? a.I / 64 : a.N / WR_BN;
    const int tile = blockIdx.x / ntn, nb = blockIdx.x % ntn;
    if (tile >= *a.ntiles) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int le = a.tile_e[tile], r0 = a.tile_r0[tile], nr = a.tile_n[tile];
    const int64_t e = (int64_t)a.lo + le;
    fq_row_map<G1, BM, NT>(a, r0, nr, rowpair, rowsrc); /* rowsrc: fp8 modes' rows of codes and scales */
    __syncthreads();

    /* this thread's weight rows: row g of each of its warp's four 8-row blocks (mxint4: also the
     * scales of its accumulator columns, rows 2t and 2t + 1 of each block) */
    const uint8_t *wp[NB];
    const void *sp[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const int wb = gated ? ((b & 1) ? a.I : 0) + nb * 64 + warp * 16 + (b >> 1) * 8 : nb * WR_BN + warp * 32 + b * 8;
        const int64_t row = e * a.N + wb + g;
        wp[b] = a.W + row * (W4 ? a.Kd / 2 : a.Kd) + t * (W4 ? 16 : 32);
        if (NV) sp[b] = (const uint8_t *)a.W_scales + row * (a.Kd / 16) + 2 * t;
        else if (MX) sp[b] = (const uint8_t *)a.W_scales + row * (a.Kd / 32) + t;
        else if (I4F) sp[b] = (const uint16_t *)a.W_scales + row * (a.Kd / 32) + t;
        else if (INT4) sp[b] = (const uint16_t *)a.W_scales + (e * a.N + wb + 2 * t) * (a.Kd / 32);
        else if (BLOCK) sp[b] = (const float *)a.W_scales + (e * (a.N / 128) + (wb + g) / 128) * (a.Kd / 128);
        else sp[b] = nullptr;
    }
    /* codes of the chunk and its next; scale codes (mxint4: rows 2t, 2t + 1 x the chunk's 4 groups) */
    constexpr int NS = INT4 ? 4 : 1;
    uint32_t wc[NB][WW], wn[NB][WW], sc[NB][NS], sn[NB][NS];
    auto load_w = [&](int kc, uint32_t (&w)[NB][WW], uint32_t (&s)[NB][NS]) {
#pragma unroll
        for (int b = 0; b < NB; b++) {
            const uint4 *p = (const uint4 *)(wp[b] + (int64_t)kc * (W4 ? KC / 2 : KC));
#pragma unroll
            for (int v = 0; v < WW / 4; v++) {
                const uint4 x = __ldg(p + v);
                w[b][4 * v] = x.x;
                w[b][4 * v + 1] = x.y;
                w[b][4 * v + 2] = x.z;
                w[b][4 * v + 3] = x.w;
            }
            if (INT4) {
                /* byte-word m at bytes 16m + 4t of the chunk's 64 (this lane loaded 16t .. 16t + 15):
                 * a 4 x 4 word transpose over the row's four lanes (t ^ 2, then t ^ 1) */
                wr_xchg(w[b][0], w[b][1], w[b][2], w[b][3], t & 2, 2); /* words 0-1 with t ^ 2 (t >= 2), else 2-3 */
                wr_xchg(w[b][0], w[b][2], w[b][1], w[b][3], t & 1, 1); /* words 0, 2 with t ^ 1 (t odd), else 1, 3 */
                const uint16_t *s0 = (const uint16_t *)sp[b] + kc * 4;
                const uint2 u0 = __ldg((const uint2 *)s0), u1 = __ldg((const uint2 *)(s0 + a.Kd / 32));
                s[b][0] = u0.x;
                s[b][1] = u0.y;
                s[b][2] = u1.x;
                s[b][3] = u1.y;
                continue;
            }
            /* scale codes: nvfp4 the two of the thread's 32 codes, mxfp4 its one */
            if (NV) s[b][0] = __ldg((const uint16_t *)((const uint8_t *)sp[b] + kc * 8));
            else if (MX) s[b][0] = __ldg((const uint8_t *)sp[b] + kc * 4);
            else if (I4F) s[b][0] = __ldg((const uint16_t *)sp[b] + kc * 4);
            else if (BLOCK) s[b][0] = __float_as_uint(__ldg((const float *)sp[b] + kc));
            else s[b][0] = 0;
        }
    };

    /* activation pieces: piece c = (row c / 8, columns 16 (c % 8)) of a chunk; fp8 modes: codes
     * from the quantiser (a row from rowsrc), 4-bit: 16-bit from a.A_bf16 (moe__fq_a16's rows, in
     * tile order) */
    uint4 ra[PT][2];
    uint32_t rs[PT];
    auto load_a = [&](int kc) {
#pragma unroll
        for (int i = 0; i < PT; i++) {
            const int c = tid + i * NT, r = c >> 3, q = c & 7;
            rs[i] = 0;
            ra[i][0] = ra[i][1] = make_uint4(0, 0, 0, 0);
            if (r >= nr) continue;
            if (F16) {
                const int src = rowsrc[r];
                ra[i][0] = *(const uint4 *)(a.A_codes + (int64_t)src * a.Kd + (int64_t)kc * KC + q * 16);
                if (BLOCK && q == 0) rs[i] = __float_as_uint(((const float *)a.A_scales)[(int64_t)src * (a.Kd / 128) + kc]);
            } else {
                const uint4 *p = (const uint4 *)(a.A_bf16 + (int64_t)(r0 + r) * a.Kd + (int64_t)kc * KC + q * 16);
                ra[i][0] = p[0];
                ra[i][1] = p[1];
            }
        }
    };
    /* a piece's 16-bit pairs into buffer bf, in the slots its weights' codes take (above) */
    auto store_a = [&](int bf) {
#pragma unroll
        for (int i = 0; i < PT; i++) {
            const int c = tid + i * NT, r = c >> 3, q = c & 7;
            uint4 v[2] = {ra[i][0], ra[i][1]};
            if (F16) { /* e4m3 codes -> f16 pairs (0, 1), (2, 3), ...; zero codes give zeros */
                uint32_t o[8];
                moe__fq_e4m3x4_f16(ra[i][0].x, o[0], o[1]);
                moe__fq_e4m3x4_f16(ra[i][0].y, o[2], o[3]);
                moe__fq_e4m3x4_f16(ra[i][0].z, o[4], o[5]);
                moe__fq_e4m3x4_f16(ra[i][0].w, o[6], o[7]);
                v[0] = make_uint4(o[0], o[1], o[2], o[3]);
                v[1] = make_uint4(o[4], o[5], o[6], o[7]);
            }
#pragma unroll
            for (int h = 0; h < 2; h++) { /* elements 8h .. 8h + 7 of the piece: byte-word m of quarter tq */
                const int m = INT4 ? q >> 1 : 2 * (q & 1) + h, tq = INT4 ? 2 * (q & 1) + h : q >> 1;
                uint16_t *row = As[bf] + r * SROW + 2 * tq;
                const uint4 x = v[h];
                if (F16) { /* element 4jj + i (jj = 2h, 2h + 1): step 4 (q & 1) + jj, pairs (0, 1), (2, 3) */
                    *(uint32_t *)(row + 16 * (2 * m)) = x.x;
                    *(uint32_t *)(row + 16 * (2 * m) + 8) = x.y;
                    *(uint32_t *)(row + 16 * (2 * m + 1)) = x.z;
                    *(uint32_t *)(row + 16 * (2 * m + 1) + 8) = x.w;
                } else { /* pairs (n, n + 4) into step 2m + (n >> 1), slot 2t + 8 (n & 1) */
                    *(uint32_t *)(row + 16 * (2 * m)) = __byte_perm(x.x, x.z, 0x5410);
                    *(uint32_t *)(row + 16 * (2 * m) + 8) = __byte_perm(x.x, x.z, 0x7632);
                    *(uint32_t *)(row + 16 * (2 * m + 1)) = __byte_perm(x.y, x.w, 0x5410);
                    *(uint32_t *)(row + 16 * (2 * m + 1) + 8) = __byte_perm(x.y, x.w, 0x7632);
                }
            }
            if (BLOCK && q == 0) sA[bf][r] = __uint_as_float(rs[i]);
        }
    };

    float acc[MI][NB][4] = {}, part[MI][NB][4] = {};

    const int NC = a.Kd / KC;
    load_w(0, wc, sc);
    load_a(0);
    store_a(0);
    __syncthreads();
    for (int kc = 0; kc < NC; kc++) {
        const bool more = kc + 1 < NC;
        if (more) {
            load_w(kc + 1, wn, sn);
            load_a(kc + 1);
        }
        const uint16_t *as = As[kc & 1];
        uint32_t pr[NB][4];
#pragma unroll
        for (int j = 0; j < KC / 16; j++) {
            uint32_t af[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
                moe__fm_ldsm4(af[mi], moe__fm_smem(as + (mi * 16 + (lane & 15)) * SROW + 16 * j + (lane >> 4) * 8));
#pragma unroll
            for (int b = 0; b < NB; b++) {
                uint32_t b0, b1;
                if (F16) {
                    moe__fq_e4m3x4_f16(wc[b][j], b0, b1);
                } else {
                    const int m = j >> 1; /* byte-word m: steps 2m and 2m + 1 */
                    if (!(j & 1)) {
                        /* its scale: nvfp4 byte m / 2 of the quarter's, mxfp4 its one; mxint4 on the sums */
                        const uint32_t code = NV ? (sc[b][0] >> (8 * (m >> 1))) & 0xFF : sc[b][0];
                        if (I4F) moe__fq_i4x8_f16(wc[b][m], moe__fq_i4_scale2(code, a.W_fold), pr[b]);
                        else moe__fq_w4x8_pairs<!INT4>(wc[b][m], moe__fq_scale2<MODE>(code), pr[b]);
                    }
                    b0 = pr[b][(j & 1) * 2];
                    b1 = pr[b][(j & 1) * 2 + 1];
                }
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    if (BLOCK || INT4) wr_mma<F16>(part[mi][b], af[mi], b0, b1);
                    else wr_mma<HM>(acc[mi][b], af[mi], b0, b1);
                }
            }
            if (INT4 && (j & 1)) { /* the end of 32-column group G: acc += part x the column's scale */
                const int G = j >> 1;
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    /* rows 2t (sc[b][0..1]) and 2t + 1 (sc[b][2..3]): group G is bf16 G of the four */
                    const float s0 = __uint_as_float(((sc[b][G >> 1] >> (16 * (G & 1))) & 0xFFFFu) << 16);
                    const float s1 = __uint_as_float(((sc[b][2 + (G >> 1)] >> (16 * (G & 1))) & 0xFFFFu) << 16);
#pragma unroll
                    for (int mi = 0; mi < MI; mi++) wr_promote(acc[mi][b], part[mi][b], s0, s1, s0, s1);
                }
            }
        }
        if (BLOCK) { /* acc += part x a_scale(row) x w_scale(block) */
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const float x0 = sA[kc & 1][mi * 16 + g], x1 = sA[kc & 1][mi * 16 + g + 8];
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    const float w = __uint_as_float(sc[b][0]);
                    wr_promote(acc[mi][b], part[mi][b], x0 * w, x0 * w, x1 * w, x1 * w);
                }
            }
        }
        if (more) {
            store_a((kc + 1) & 1);
#pragma unroll
            for (int b = 0; b < NB; b++) {
#pragma unroll
                for (int u = 0; u < NS; u++) sc[b][u] = sn[b][u];
#pragma unroll
                for (int v = 0; v < WW; v++) wc[b][v] = wn[b][v];
            }
        }
        __syncthreads();
    }

    /* epilogue, from registers: acc[mi][b][q] is tile row mi * 16 + g (+8 for q >= 2), column
     * 2t (+1 for odd q) of block b */
    float ts0 = 1.0f;
    if (MODE == MOE_QUANT_FP8 || NV) ts0 = a.A_tensor[0] * a.W_tensor[e];
    if (I4F) ts0 = a.W_unfold;
    const float *bias = a.bias ? a.bias + e * a.N : nullptr;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int r = mi * 16 + g + hf * 8;
            if (r >= nr) continue;
            const int p = rowpair[r];
            if (I4F) { /* 2^-b, then the row's 2^-a (two exact steps, no early underflow) */
                const float tr = __ldg(a.A_rows + r0 + r);
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    acc[mi][b][2 * hf] = acc[mi][b][2 * hf] * ts0 * tr;
                    acc[mi][b][2 * hf + 1] = acc[mi][b][2 * hf + 1] * ts0 * tr;
                }
            }
            const float ts = I4F ? 1.0f : ts0;
            if (G1) {
                const float c1 = a.llama4 ? a.wts[p] : 1.0f;
                uint16_t *orow = a.inter + (int64_t)(r0 + r) * a.I;
                if (gated) {
                    moe__fm_act_at(a.act, [&](auto ak) {
#pragma unroll
                        for (int h = 0; h < 2; h++)
                            moe__fq_epi_gated2<decltype(ak)::v>(
                                a, orow, bias, nb * 64 + warp * 16 + h * 8 + 2 * t, acc[mi][2 * h][2 * hf],
                                acc[mi][2 * h][2 * hf + 1], acc[mi][2 * h + 1][2 * hf], acc[mi][2 * h + 1][2 * hf + 1],
                                ts, c1);
                    });
                } else {
#pragma unroll
                    for (int b = 0; b < NB; b++)
                        moe__fq_epi_relu2_2(a, orow, bias, nb * WR_BN + warp * 32 + b * 8 + 2 * t, acc[mi][b][2 * hf],
                                            acc[mi][b][2 * hf + 1], ts, c1);
                }
            } else {
                const float w = a.llama4 ? 1.0f : a.wts[p];
                float *yrow = a.y + (int64_t)p * a.N;
#pragma unroll
                for (int b = 0; b < NB; b++)
                    moe__fq_epi_down2(yrow, bias, nb * WR_BN + warp * 32 + b * 8 + 2 * t, acc[mi][b][2 * hf],
                                      acc[mi][b][2 * hf + 1], ts, w);
            }
        }
}

/* --------------------------------------------------------- host glue -- */

/* A tensor view of `dtype` and shape at byte offset `off` of the workspace buffer. */
moe_status fq_view(moe_tensor **out, const moe_workspace *ws, size_t off, int dtype, int ndim, const int64_t *shape) {
    const int bits = moe_dtype_bits(dtype);
    const int64_t byte = ws->buf->offset + (int64_t)off;
    const int64_t el = bits == 4 ? byte * 2 : byte / (bits / 8);
    return moe__tensor_wrap(out, ws->buf->st, dtype, ndim, shape, NULL, el);
}

/* Quantise `src` ([rows, cols] bf16, contiguous) as activations of `mode` into workspace
 * views: codes at off_c, scales at off_s, the per-tensor scale / global at off_t. */
moe_status fq_quant_act(const moe_workspace *ws, int mode, const moe_tensor *src, int64_t rows, int64_t cols,
                        size_t off_c, size_t off_s, size_t off_t) {
    struct moe_qtensor q;
    memset(&q, 0, sizeof q);
    q.mode = mode;
    q.ndim = 2;
    q.shape[0] = rows;
    q.shape[1] = cols;
    int64_t one[1] = {1};
    moe_status s = MOE_OK;
    if (mode == MOE_QUANT_FP8) {
        q.block_rows = (int)rows;
        q.block_cols = (int)cols;
        s = fq_view(&q.data, ws, off_c, MOE_F8E4M3, 2, q.shape);
        if (s == MOE_OK) s = fq_view(&q.scales, ws, off_t, MOE_F32, 1, one);
    } else if (mode == MOE_QUANT_FP8_BLOCK) {
        q.block_rows = 1;
        q.block_cols = 128;
        int64_t ss[2] = {rows, cols / 128};
        s = fq_view(&q.data, ws, off_c, MOE_F8E4M3, 2, q.shape);
        if (s == MOE_OK) s = fq_view(&q.scales, ws, off_s, MOE_F32, 2, ss);
    } else { /* nvfp4 */
        q.block_rows = 1;
        q.block_cols = 16;
        int64_t ss[2] = {rows, cols / 16};
        s = fq_view(&q.data, ws, off_c, MOE_E2M1, 2, q.shape);
        if (s == MOE_OK) s = fq_view(&q.scales, ws, off_s, MOE_F8E4M3, 2, ss);
        if (s == MOE_OK) s = fq_view(&q.global, ws, off_t, MOE_F32, 1, one);
    }
    if (s == MOE_OK) s = moe__cuda_quantize(src, &q);
    moe_tensor_free(q.data);
    moe_tensor_free(q.scales);
    moe_tensor_free(q.global);
    return s;
}

/* Tile configurations: small (decode: few rows per expert; BK 128 keeps 64 fp8 / 32 fp4
 * weight bytes per thread in flight), medium, large (prefill).  BK must divide H and I, which
 * are only guaranteed to be multiples of 128 (a BK 256 small tile measured faster for decode
 * but needs a K tail; not done). */
#define FQ_SMALL 16, 64, 128, 1, 4
#define FQ_MEDIUM 64, 64, 128, 2, 2
#define FQ_LARGE 128, 128, 64, 2, 4

template <int MODE, int BM, int BN, int BK, int WM, int WN>
moe_status fq_gemms(cudaStream_t st, const gemm_args &a1, const gemm_args &a2, int64_t P, int lc,
                    const moe_workspace *ws, const moe_tensor *inter, size_t off_gc, size_t off_gs, size_t off_gt,
                    int64_t I) {
    if (a1.Kd % BK != 0 || a2.Kd % BK != 0 || a1.N % BN != 0 || a2.N % BN != 0)
        return moe__err(MOE_ERR_UNSUPPORTED, FN ": experts: expected H and I multiples of %d for the %dx%dx%d tiles, got H %d, I %d",
                        BK, BM, BN, BK, a1.Kd, a2.Kd);
    const int64_t tiles = P / BM + (P < lc ? P : lc) + 1;
    k_gemm<MODE, BM, BN, BK, WM, WN, true><<<(unsigned)(tiles * (a1.N / BN)), WM * WN * 32, 0, st>>>(a1);
    MOE_CUDA_LAUNCHED(FN);
    if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK || MODE == MOE_QUANT_NVFP4)
        MOE_TRY(fq_quant_act(ws, MODE, inter, P, I, off_gc, off_gs, off_gt));
    k_gemm<MODE, BM, BN, BK, WM, WN, false><<<(unsigned)(tiles * (a2.N / BN)), WM * WN * 32, 0, st>>>(a2);
    MOE_CUDA_LAUNCHED(FN);
    return MOE_OK;
}

/* Hopper (moe__fq_qgmma_use): GEMM1 and GEMM2 by the wgmma kernels of fused_qgmma.cu (128-row
 * tiles), GEMM1's A rows permuted into xp (the y region) first. */
moe_status fq_qgmma_gemms(cudaStream_t st, int dev, int mode, const gemm_args &a1, const gemm_args &a2, int64_t P,
                          int lc, const moe_workspace *ws, const moe_tensor *inter, size_t off_gc, size_t off_gs,
                          size_t off_gt, int64_t I, void *xp) {
    const int64_t tiles = P / 128 + (P < lc ? P : lc) + 1;
    MOE_TRY(moe__fq_qgmma(st, dev, mode, true, a1, P, tiles, xp));
    if ((mode == MOE_QUANT_FP8 || mode == MOE_QUANT_FP8_BLOCK || mode == MOE_QUANT_NVFP4) &&
        !moe__fq_qgmma_quantises_inter(mode, a1.Kd))
        MOE_TRY(fq_quant_act(ws, mode, inter, P, I, off_gc, off_gs, off_gt));
    return moe__fq_qgmma(st, dev, mode, false, a2, P, tiles, nullptr);
}

/* k_wreg's GEMMs (fp8, fp8_block, nvfp4, mxfp4; H and I multiples of 128), tile table of WR_BM rows;
 * GEMM1's 16-bit A rows in xp (the y region, unused until GEMM2's epilogue). */
template <int MODE>
moe_status fq_wreg_gemms(cudaStream_t st, int dev, const gemm_args &a1, const gemm_args &a2, int64_t P, int lc,
                         const moe_workspace *ws, const moe_tensor *inter, size_t off_gc, size_t off_gs, size_t off_gt,
                         int64_t I, void *xp) {
    const int64_t tiles = P / WR_BM + (P < lc ? P : lc) + 1;
    const unsigned g1 = (unsigned)(tiles * (a1.gated ? a1.I / 64 : a1.N / WR_BN)), g2 = (unsigned)(tiles * (a2.N / WR_BN));
    if (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_FP8_BLOCK) {
        /* the activations' codes straight from the quantiser (their e4m3 -> f16 is one instruction a pair) */
        k_wreg<MODE, true><<<g1, WR_NT, 0, st>>>(a1);
        MOE_CUDA_LAUNCHED(FN);
        MOE_TRY(fq_quant_act(ws, MODE, inter, P, I, off_gc, off_gs, off_gt));
        k_wreg<MODE, false><<<g2, WR_NT, 0, st>>>(a2);
        MOE_CUDA_LAUNCHED(FN);
        return MOE_OK;
    }
    /* 4-bit: the activations widened to 16-bit once, not once per column tile */
    gemm_args b1 = a1, b2 = a2;
    const uint4 *A16 = nullptr;
    MOE_TRY(moe__fq_a16(st, dev, MODE, true, a1, P, xp, &A16));
    b1.A_bf16 = (const uint16_t *)A16;
    k_wreg<MODE, true><<<g1, WR_NT, 0, st>>>(b1);
    MOE_CUDA_LAUNCHED(FN);
    if (MODE == MOE_QUANT_NVFP4) MOE_TRY(fq_quant_act(ws, MODE, inter, P, I, off_gc, off_gs, off_gt));
    MOE_TRY(moe__fq_a16(st, dev, MODE, false, a2, P, nullptr, &A16));
    b2.A_bf16 = (const uint16_t *)A16;
    k_wreg<MODE, false><<<g2, WR_NT, 0, st>>>(b2);
    MOE_CUDA_LAUNCHED(FN);
    return MOE_OK;
}

/* Whether a call with P pairs over lc local experts runs k_wreg: H and I multiples of 128, scales
 * 8-byte aligned, fewer pairs per local expert on average than moe__fq_pairs_bound (unset: where
 * the Hopper wgmma kernels start; MOE_FUSED_QWREG=0: never). */
bool fq_wreg_use(int mode, int64_t P, int lc, const struct moe_experts *ex) {
    const long bound = moe__fq_pairs_bound("MOE_FUSED_QWREG", mode);
    if (ex->H % 128 != 0 || ex->I % 128 != 0 || P >= (int64_t)bound * lc) return false;
    /* codes are 16-byte aligned (checked when the experts are made); mxint4's scales are loaded 8
     * bytes at a time (CUDA experts copy misaligned scales when they are made: this is a guard) */
    const uintptr_t sc = (uintptr_t)moe_tensor_data(moe_qtensor_scales(ex->q13)) |
                         (uintptr_t)moe_tensor_data(moe_qtensor_scales(ex->q2));
    return (sc & 7) == 0;
}

/* Row tile of each configuration, chosen from the average rows per local expert. */
int fq_config(int64_t P, int lc) {
    if (P < (int64_t)24 * lc) return 0;
    if (P < (int64_t)96 * lc) return 1;
    return 2;
}
const int fq_bm[3] = {16, 64, 128};

template <int MODE>
moe_status fq_mode(cudaStream_t st, int cfg, const gemm_args &a1, const gemm_args &a2, int64_t P, int lc,
                   const moe_workspace *ws, const moe_tensor *inter, size_t off_gc, size_t off_gs, size_t off_gt,
                   int64_t I) {
    if (cfg == 2) return fq_gemms<MODE, FQ_LARGE>(st, a1, a2, P, lc, ws, inter, off_gc, off_gs, off_gt, I);
    if (cfg == 1) return fq_gemms<MODE, FQ_MEDIUM>(st, a1, a2, P, lc, ws, inter, off_gc, off_gs, off_gt, I);
    return fq_gemms<MODE, FQ_SMALL>(st, a1, a2, P, lc, ws, inter, off_gc, off_gs, off_gt, I);
}

} // namespace

extern "C" moe_status moe__cuda_fused_quant(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    struct moe_workspace *ws = A->ws;
    moe__cuda_guard g(FN, ex->dev.index);
    MOE_TRY(g.status);
    const int mode = ex->quant;
    const int64_t T = A->T, P = T * A->K, H = ex->H, I = ex->I;
    const int lc = A->local_count, lo = A->local_offset;
    unsigned char *base = (unsigned char *)moe_tensor_data(ws->buf);

    const bool gemv = moe__fq_gemv_eligible(A);
    const int rin = gemv ? moe__fq_gemv_routes(A, g.dev) : 0;
    /* routing left to this call (A->route_pending): by the decode kernels alone (rin 2), else by the
     * routing kernel first */
    if (A->route_pending && rin != 2)
        MOE_TRY(moe__cuda_route(A->route, A->logits, A->bias, (moe_tensor *)A->ids, (moe_tensor *)A->wts, A->replay));
    if (gemv) {
        const bool bk = moe__fq_gemv_bulk(A, rin);
        if (lc > 0)
            moe__fused_path_hit(rin ? (bk ? MOE_FUSED_PATH_GEMV_ROUTE_BULK : MOE_FUSED_PATH_GEMV_ROUTE)
                                    : (bk ? MOE_FUSED_PATH_GEMV_BULK : MOE_FUSED_PATH_GEMV));
        return moe__fq_gemv(g, A, rin, bk); /* decode GEMV path: fused_qgemv.cu */
    }

    const moe__fq_layout L = moe__fq_layout_of(ws); /* as moe__fused_quant_ws_bytes */
    const int64_t wtiles = L.wtiles;
    const size_t off_misc = L.misc, off_tiles = L.tiles, off_xc = L.xc, off_xs = L.xs, off_gc = L.gc, off_gs = L.gs;
    int32_t *ntiles = (int32_t *)(base + off_misc);
    const size_t off_xt = off_misc + 16, off_gt = off_misc + 32;
    int32_t *tile_e = (int32_t *)(base + off_tiles);
    int32_t *tile_r0 = tile_e + wtiles, *tile_n = tile_r0 + wtiles;
    int32_t *sorted = (int32_t *)(base + ws->off_sorted);
    int32_t *err = (int32_t *)(base + ws->off_err);
    uint16_t *inter = (uint16_t *)(base + ws->off_inter);
    float *y = (float *)(base + ws->off_y);
    const int32_t *ids = (const int32_t *)moe_tensor_data(A->ids);
    const float *wts = (const float *)moe_tensor_data(A->wts);
    const bool wq = mode != MOE_QUANT_MXFP4 && mode != MOE_QUANT_MXINT4; /* activations quantised */

    if (lc > 0) {
        const bool qg = moe__fq_qgmma_use(mode, P, lc, H, I); /* Hopper wgmma kernels */
        const bool wr = !qg && fq_wreg_use(mode, P, lc, ex); /* register-operand tiles */
        const int cfg = qg ? 2 : fq_config(P, lc);
        const int BM = wr ? WR_BM : fq_bm[cfg];
        const bool rs = qg && moe__fq_qgmma_rs(mode, H); /* ... the register-operand one */
        /* nvfp4 on k_qg_rs: x quantised once a token by k_qr_nvfp4_x after the align, which writes
         * the pairs' sorted rows (pos, in the x-codes region, unused then) while its other blocks
         * (one an SM but its first) take x's amax in parts (the x-scales region); MOE_FUSED_NVX=0:
         * the quantiser, then k_qg_codes16<true, true> once a pair */
        const int nparts = moe__cuda_sm_count(g.dev);
        /* x made once a token needs the pairs' rows (i32 [P]) to fit the x-codes region */
        const bool xonce = rs && (size_t)P * 4 <= (size_t)ws->max_tokens * (size_t)H;
        const bool nvx = mode == MOE_QUANT_NVFP4 && xonce &&
                         (size_t)nparts * 4 <= (size_t)ws->max_tokens * (size_t)(H / 16) &&
                         !moe__fq_env_off("MOE_FUSED_NVX"); /* hidden is 16-byte aligned (moe_fused_moe) */
        /* fp8_block on k_qg_rs likewise (k_qr_fb_x: x's scales into the x-scales region, the pairs'
         * rows in the x-codes region); MOE_FUSED_FBX=0: the quantiser, then k_qg_codes16<false, true> once a pair */
        const bool fbx = mode == MOE_QUANT_FP8_BLOCK && xonce && !moe__fq_env_off("MOE_FUSED_FBX");
        /* mxfp4 / mxint4 on k_qg_rs: x's RS-order rows (mxint4 f16: times the token's power of two)
         * made once a token (k_qr_xonce); MOE_FUSED_MXX=0: once a pair (k_qr_permute) */
        const bool mxx = (mode == MOE_QUANT_MXFP4 || mode == MOE_QUANT_MXINT4) && xonce && !moe__fq_env_off("MOE_FUSED_MXX");
        int32_t *xpos = nvx || fbx || mxx ? (int32_t *)(base + off_xc) : nullptr;
        unsigned int *xpart = nvx ? (unsigned int *)(base + off_xs) : nullptr;
        /* 1. x */
        if (wq && !nvx && !fbx) MOE_TRY(fq_quant_act(ws, mode, A->hidden, T, H, off_xc, off_xs, off_xt));
        /* 2. align */
        /* mxint4 on f16 MMAs (MOE__FQ_I4F) in either register-operand kernel, where the experts'
         * scales allow the fold (moe__i4_fold_of at creation); MOE_FUSED_I4F16=0: never */
        const bool i4f = (rs || wr) && moe__fq_i4f_ok(ex);
        /* mxfp4 on k_qg_rs with its scales folded into the widening (MOE__FQ_F4S) where they are
         * all at most 2 (moe_experts.mx_small); MOE_FUSED_MXS=0: never */
        const bool f4s = rs && moe__fq_f4s_ok(ex);
        const int km = i4f ? MOE__FQ_I4F : f4s ? MOE__FQ_F4S : mode; /* the kernels' mode */
        moe__fused_path_hit(qg ? (rs ? (i4f ? MOE_FUSED_PATH_WGMMA_RS_I4F16 : nvx || fbx || mxx ? MOE_FUSED_PATH_WGMMA_RS_XONCE : MOE_FUSED_PATH_WGMMA_RS) : MOE_FUSED_PATH_WGMMA)
                                : wr ? (i4f ? MOE_FUSED_PATH_WREG_I4F16 : MOE_FUSED_PATH_WREG) : MOE_FUSED_PATH_TILE);
        const size_t sm = (size_t)2 * lc * sizeof(int);
        moe__k_fm_align<<<nvx ? 1 + nparts : 1, MOE_FM_ALIGN_THREADS, sm, g.stream>>>(
            ids, P, (int)ex->E, lo, lc, BM, sorted, tile_e, tile_r0, tile_n, ntiles, err, xpos,
            (const uint4 *)moe_tensor_data(A->hidden), T * H / 8, xpart); /* fused_moe.cu */
        MOE_CUDA_LAUNCHED(FN);
        /* per-tensor modes: rows past the local pairs must not enter the intermediate amax (nvfp4
         * on k_qg_rs: GEMM1 takes it from the values it writes) */
        if (mode == MOE_QUANT_FP8 || (mode == MOE_QUANT_NVFP4 && !rs))
            MOE_CUDA_TRY(FN, cudaMemsetAsync(inter, 0, (size_t)P * (size_t)I * 2, g.stream));
        gemm_args a1;
        memset(&a1, 0, sizeof a1);
        a1.A_bf16 = (const uint16_t *)moe_tensor_data(A->hidden);
        a1.A_codes = base + off_xc;
        a1.A_scales = base + off_xs;
        a1.A_tensor = (const float *)(base + off_xt);
        a1.W = (const uint8_t *)moe_tensor_data(moe_qtensor_data(ex->q13));
        a1.W_scales = moe_tensor_data(moe_qtensor_scales(ex->q13));
        a1.W_tensor = mode == MOE_QUANT_FP8 ? (const float *)a1.W_scales
                      : mode == MOE_QUANT_NVFP4 ? (const float *)moe_tensor_data(moe_qtensor_global_scale(ex->q13))
                                                : nullptr;
        a1.bias = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : nullptr;
        a1.sorted = sorted;
        a1.tile_e = tile_e;
        a1.tile_r0 = tile_r0;
        a1.tile_n = tile_n;
        a1.ntiles = ntiles;
        a1.wts = wts;
        a1.N = (int)ex->N1;
        a1.Kd = (int)H;
        a1.K = A->K;
        a1.lo = lo;
        a1.act = ex->act;
        a1.llama4 = A->llama4;
        a1.I = (int)I;
        a1.E = (int)ex->E;
        a1.gated = ex->act != MOE_ACT_RELU2;
        a1.alpha = ex->alpha;
        a1.beta = ex->beta;
        a1.limit = ex->limit;
        a1.inter = inter;
        a1.inter_amax = (unsigned int *)(base + off_misc + MOE__FQ_IAMAX_OFF);
        a1.A_pos = xpos;
        a1.A_amax = xpart;
        a1.A_amax_n = nparts;
        a1.T = T;
        a1.W_swz = !moe__fq_env_off("MOE_FUSED_QSW"); /* k_qg_rs's 4-bit codes with the 32-byte swizzle */
        gemm_args a2 = a1;
        a2.A_pos = nullptr;
        a2.A_amax = nullptr;
        a2.A_bf16 = inter;
        a2.A_codes = base + off_gc;
        a2.A_scales = base + off_gs;
        a2.A_tensor = (const float *)(base + off_gt);
        a2.W = (const uint8_t *)moe_tensor_data(moe_qtensor_data(ex->q2));
        a2.W_scales = moe_tensor_data(moe_qtensor_scales(ex->q2));
        a2.W_tensor = mode == MOE_QUANT_FP8 ? (const float *)a2.W_scales
                      : mode == MOE_QUANT_NVFP4 ? (const float *)moe_tensor_data(moe_qtensor_global_scale(ex->q2))
                                                : nullptr;
        a2.bias = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : nullptr;
        a2.N = (int)H;
        a2.Kd = (int)I;
        a2.gated = 0;
        a2.y = y;
        if (i4f) { /* x's per-token powers of two (xs region), per sorted row (gc), the intermediate's (gs) */
            a1.A_rows = (const float *)(base + off_gc);
            a2.A_rows = (const float *)(base + off_gs);
            a1.W_fold = ex->i4_fold13;
            a1.W_unfold = 1.0f / ex->i4_fold13;
            a2.W_fold = ex->i4_fold2;
            a2.W_unfold = 1.0f / ex->i4_fold2;
            MOE_TRY(moe__fq_i4_xrows(g.stream, g.dev, a1.A_bf16, T, (int)H, (float *)(base + off_xs)));
        }
        /* 3-5. GEMM1, intermediate quantisation, GEMM2 */
        moe_tensor *iv = NULL;
        int64_t ishape[2] = {P, I};
        if (wq) MOE_TRY(fq_view(&iv, ws, ws->off_inter, MOE_BF16, 2, ishape));
        moe_status s;
        if (qg)
            s = fq_qgmma_gemms(g.stream, g.dev, km, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y);
        else if (wr) switch (km) {
        case MOE_QUANT_FP8: s = fq_wreg_gemms<MOE_QUANT_FP8>(g.stream, g.dev, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y); break;
        case MOE_QUANT_FP8_BLOCK:
            s = fq_wreg_gemms<MOE_QUANT_FP8_BLOCK>(g.stream, g.dev, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y);
            break;
        case MOE_QUANT_NVFP4: s = fq_wreg_gemms<MOE_QUANT_NVFP4>(g.stream, g.dev, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y); break;
        case MOE_QUANT_MXFP4: s = fq_wreg_gemms<MOE_QUANT_MXFP4>(g.stream, g.dev, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y); break;
        case MOE__FQ_I4F: s = fq_wreg_gemms<MOE__FQ_I4F>(g.stream, g.dev, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y); break;
        default: s = fq_wreg_gemms<MOE_QUANT_MXINT4>(g.stream, g.dev, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I, base + ws->off_y);
        }
        else switch (mode) {
        case MOE_QUANT_FP8: s = fq_mode<MOE_QUANT_FP8>(g.stream, cfg, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I); break;
        case MOE_QUANT_FP8_BLOCK:
            s = fq_mode<MOE_QUANT_FP8_BLOCK>(g.stream, cfg, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I);
            break;
        case MOE_QUANT_NVFP4: s = fq_mode<MOE_QUANT_NVFP4>(g.stream, cfg, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I); break;
        case MOE_QUANT_MXFP4: s = fq_mode<MOE_QUANT_MXFP4>(g.stream, cfg, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I); break;
        case MOE_QUANT_MXINT4: s = fq_mode<MOE_QUANT_MXINT4>(g.stream, cfg, a1, a2, P, lc, ws, iv, off_gc, off_gs, off_gt, I); break;
        default: s = moe__err(MOE_ERR_UNSUPPORTED, FN ": experts: quantisation mode %d has no CUDA kernels", mode);
        }
        moe_tensor_free(iv);
        MOE_TRY(s);
    }
    /* 6. combine */
    const int threads = 256;
    moe__k_fm_finalize<<<moe__cuda_grid(g.dev, T * (H / 8), threads), threads, 0, g.stream>>>(
        y, ids, T, A->K, (int)H, (int)ex->E, lo, lc, (uint16_t *)moe_tensor_data(A->out)); /* fused_moe.cu */
    MOE_CUDA_LAUNCHED(FN);
    return MOE_OK;
}
