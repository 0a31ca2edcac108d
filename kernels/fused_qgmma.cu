/* fused_qgmma.cu -- Hopper (sm_90a) grouped GEMMs of the quantised fused MoE at prefill sizes
 * (fused_quant.cu's large configuration), every mode, replacing its mma.sync tile kernels there.
 * Three kernels, all warp-specialised like fused_moe.cu's moe__k_fm_gemm_ws (384 threads, 1 CTA
 * per SM, persistent over (row tile, column tile) work items in groups of 8 row tiles; mbarrier
 * pipelines; consumers = warpgroups 1-2, 64 rows each; tiles 128 x 128; gated GEMM1 tiles hold
 * 64 gate rows then the 64 matching up rows, so accumulator columns j (gate) and j + 64 (up) sit
 * in the same thread and the activation runs on registers):
 *
 *   k_qg_rs (default for fp8, nvfp4, mxfp4, mxint4, and fp8_block from H = 4096 (qg_variant);
 *     below, before the kernel): the weights widened in registers as wgmma's A operand, the tokens
 *     as B from shared memory.
 *   k_qg_exact (fp8_block below H = 4096; every mode with MOE_FUSED_QRS=0): the weight tile's codes
 *     come by bulk tensor copy and are widened into a swizzled 16-bit shared tile -- e4m3 to f16
 *     by warps 1-3 (exact: every e4m3 value is an f16), e2m1 x its scale / int4 to bf16 by the
 *     consumers themselves while the previous stage multiplies (exact in bf16) -- and
 *     wgmma.m64n128k16 f16 / bf16 multiplies
 *     them with 16-bit activations: x's rows permuted into sorted order in the workspace's y
 *     region (unused until GEMM2's epilogue; fp8 / nvfp4 codes widened by k_qg_codes16, mx modes
 *     x itself), the intermediate widened in its own region once quantised (fp8_block:
 *     quantised and widened in one pass, k_qg_block16; mx modes: as it is).  The products are
 *     exact and the MMA accumulates in f32, so the result is the CPU reference's up to f32
 *     accumulation order (on an H100, bit-identical to the tile kernels).  BK 64, 5 stages
 *     (4-bit: 6).
 *   k_qg_fp8 (MOE_FUSED_FP8MMA=1, fp8 / fp8_block): e4m3 A and B straight into
 *     wgmma.m64n128k32 .e4m3 (twice the f16 rate, half the shared bytes).  Hopper's fp8 MMAs sum
 *     their products at reduced precision (about 14 bits: DeepSeek-V3 report, section 3.3.2);
 *     measured 2.5-3.2e-3 relative L2 off the CPU reference on an H100/H200 even with every k32
 *     MMA started from zero and added up in f32 by the CUDA cores (as done here): the numerics
 *     of engines that run fp8 tensor cores (DeepGEMM promotes every 128), not the reference's.
 *     BK 128, 6 stages.
 *
 * Scales: fp8 sx * sw[e] and nvfp4's two global scales in the epilogue; fp8_block adds each
 * 128-column K block's partial sum to the f32 accumulator times a_scale(row, block) *
 * w_scale(block) (DeepSeek-V3's promotion; on k_qg_rs the two consumer warpgroups take turns
 * issuing a block's MMAs, so one promotes while the other's MMAs run), mxint4 each 32-column
 * group's times the bf16 weight scale of its column, as the tile kernels do; nvfp4's e4m3 and mxfp4's ue8m0 block scales are in
 * the widened values.  Rows r >= nr of an A box (next expert, stale rows, zero fill past P) are
 * computed and never written. */
#include "cuda_common.cuh"
#include "fused_moe.cuh"
#include "fused_quant.cuh"
#include "quant_rows.cuh"

#include <cuda_fp8.h>
#include <limits.h>
#include <stdlib.h>
#include <type_traits>

#define FN "moe_fused_moe"

namespace {

constexpr int QG_BM = 128, QG_BN = 128;
/* k_qg_exact: BK 64; per stage A 16-bit 16 KB, B 16-bit 16 KB, B codes (8 KB e4m3, 4 KB packed
 * 4-bit), mxint4's weight scales as f32 [2 groups][128 rows] 1 KB; 5 stages (fp8) or 6 (4-bit) */
constexpr int QX_BK = 64;
#define QX_CONV 96 /* converter threads: warps 1-3 */
template <int MODE> struct qx_cfg {
    static constexpr bool W4 = MODE == MOE_QUANT_NVFP4 || MODE == MOE_QUANT_MXFP4 || MODE == MOE_QUANT_MXINT4;
    static constexpr bool INT4 = MODE == MOE_QUANT_MXINT4;
    static constexpr int CB = W4 ? QX_BK / 2 : QX_BK; /* code bytes of a weight row per stage */
    static constexpr int S = W4 ? 6 : 5;
    static constexpr int SC = INT4 ? 2 * QG_BN * 4 : 0;
    static constexpr size_t SMEM =
        (size_t)S * (QG_BM * QX_BK * 2 + QG_BN * QX_BK * 2 + QG_BN * CB + SC) + 1024 + 3 * S * 8;
};
/* k_qg_fp8: BK 128 e4m3; per stage 32 KB */
constexpr int Q8_BK = 128, Q8_S = 6;
constexpr size_t Q8_SMEM = (size_t)Q8_S * (QG_BM + QG_BN) * Q8_BK + 1024 + 2 * Q8_S * 8;

/* device helpers: only the sm_90a pass has the kernel bodies that use them */
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
/* d (64 f32) = (scale_d ? d : 0) + A(64 x 32 e4m3, smem desc) * B(32 x 128 e4m3, smem desc);
 * both K-major, 128-byte swizzle. */
__device__ __forceinline__ void qg_wgmma_e4m3(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}

/* The same with 16-bit operands (BF16: bf16, else f16), k16. */
#define QG_WGMMA16(TY)                                                                                 \
    asm volatile("{\n"                                                                                \
                 ".reg .pred p;\n"                                                                    \
                 "setp.ne.b32 p, %66, 0;\n"                                                           \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                         \
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n" \
        "}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "l"(da), "l"(db), "r"(scale_d))
template <bool BF16>
__device__ __forceinline__ void qg_wgmma_16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    if (BF16) QG_WGMMA16("bf16");
    else QG_WGMMA16("f16");
}
#undef QG_WGMMA16

/* (row tile, column tile) of work item w: groups of 8 row tiles, the row tile fastest inside
 * a group (the CTAs running at once share a few A tiles and weight tiles in L2). */
__device__ __forceinline__ void qg_item(int64_t w, int ntiles, int ntn, int &tile, int &nb) {
    const int GM = 8; /* 4: 1% faster at DeepSeek-V3 T = 4096, 16 / 32: 1-5% slower (H100) */
    const int group = (int)(w / ((int64_t)GM * ntn));
    const int in = (int)(w - (int64_t)group * GM * ntn);
    const int gs = min(GM, ntiles - group * GM);
    tile = group * GM + in % gs;
    nb = in / gs;
}

/* Rows (within an expert's N) of the two 64-row halves of column tile nb. */
__device__ __forceinline__ void qg_wrows(const moe__fq_gemm_args &a, bool gated, int nb, int &h0, int &h1) {
    if (gated) {
        h0 = nb * 64;
        h1 = a.I + nb * 64;
    } else {
        h0 = nb * 128;
        h1 = nb * 128 + 64;
    }
}

/* The work of one grouped GEMM: gated GEMM1 or not, its row tiles, its column tiles (gated: 64
 * intermediate columns, i.e. 64 gate + 64 up rows; else 128 output columns), its work items
 * (row tile x column tile) and K steps of BK. */
struct qg_grid {
    bool gated;
    int ntiles, ntn, KT;
    int64_t total;
};
template <bool G1, int BK> __device__ __forceinline__ qg_grid qg_grid_of(const moe__fq_gemm_args &a) {
    qg_grid g;
    g.gated = G1 && a.gated;
    g.ntiles = *a.ntiles;
    g.ntn = g.gated ? a.I / 64 : a.N / QG_BN;
    g.total = (int64_t)g.ntiles * g.ntn;
    g.KT = a.Kd / BK;
    return g;
}

/* Work item w of a grouped GEMM: its expert, its row tile's first row and rows, and the rows of
 * its two 64-row weight halves. */
struct qg_work {
    int64_t e;
    int r0, nr, h0, h1;
};
__device__ __forceinline__ qg_work qg_work_of(const moe__fq_gemm_args &a, const qg_grid &g, int64_t w) {
    int tile, nb;
    qg_item(w, g.ntiles, g.ntn, tile, nb);
    qg_work q;
    q.e = (int64_t)a.lo + a.tile_e[tile];
    q.r0 = a.tile_r0[tile];
    q.nr = a.tile_n[tile];
    qg_wrows(a, g.gated, nb, q.h0, q.h1);
    return q;
}

/* The producer thread of both kernels: for every work item of this CTA and K step, wait until
 * stage s is free (empty barrier at empty0 + 8s), announce its bytes on full[s] (full0 + 8s) and
 * copy the two 64-row weight boxes (CB code bytes a row, at code column kt * CB) to
 * wdst + s*128*CB and the 128-row A box (abytes a stage, at column kt * BK) to adst + s*abytes. */
template <int S, int CB, int BK>
__device__ __forceinline__ void qg_produce(const moe__fq_gemm_args &a, const CUtensorMap *tmw, const CUtensorMap *tma,
                                           const qg_grid &g, uint32_t full0, uint32_t empty0, uint32_t wdst,
                                           uint32_t adst, uint32_t abytes) {
    int it = 0;
    for (int64_t w = blockIdx.x; w < g.total; w += gridDim.x) {
        const qg_work q = qg_work_of(a, g, w);
        const int w0 = (int)(q.e * a.N) + q.h0, w1 = (int)(q.e * a.N) + q.h1;
        for (int kt = 0; kt < g.KT; kt++, it++) {
            const int s = it % S;
            const uint32_t full = full0 + 8 * s, ws = wdst + s * QG_BN * CB;
            moe__fm_mbar_wait(empty0 + 8 * s, ((it / S) & 1) ^ 1);
            moe__fm_mbar_arrive_tx(full, QG_BN * CB + abytes);
            moe__fm_tma2d(ws, tmw, kt * CB, w0, full);
            moe__fm_tma2d(ws + 64 * CB, tmw, kt * CB, w1, full);
            moe__fm_tma2d(adst + s * abytes, tma, kt * BK, q.r0, full);
        }
    }
}

/* The producer warpgroup of the two-barrier pipelines (k_qg_fp8, k_qg_rs): its registers handed
 * to the consumers, thread 0 the producer (full barriers at bar0, empty ones at bar0 + 8S). */
template <int S, int CB, int BK>
__device__ __forceinline__ void qg_producer_wg(const moe__fq_gemm_args &a, const CUtensorMap *tmw, const CUtensorMap *tma,
                                               const qg_grid &g, uint32_t bar0, uint32_t wdst, uint32_t adst,
                                               uint32_t abytes) {
    moe__fm_setmaxnreg_dec<40>();
    if (threadIdx.x == 0) qg_produce<S, CB, BK>(a, tmw, tma, g, bar0, bar0 + 8 * S, wdst, adst, abytes);
    __syncwarp();
}

/* The two-barrier pipelines' start (k_qg_fp8, k_qg_rs): thread 0 initialises S full barriers
 * (the producer's expect_tx arrival) at bar0 + 8s and S empty ones (one arrival per consumer
 * warp) at bar0 + 8(S + s), then the block syncs. */
template <int S> __device__ __forceinline__ void qg_bars2(uint32_t bar0) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; s++) {
            moe__fm_mbar_init(bar0 + 8 * s, 1);
            moe__fm_mbar_init(bar0 + 8 * (S + s), 8);
        }
        moe__fm_mbar_init_fence();
    }
    __syncthreads();
}

/* fp8_block scale rows of this thread's rows rA, rA + 8 (x: by token; the intermediate: by
 * sorted row; nullptr past nr) and of the two weight halves' 128-row blocks; KB = Kd / 128. */
template <bool G1>
__device__ __forceinline__ void qg_scales(const moe__fq_gemm_args &a, int rA, int r0, int nr, int64_t e, int h0,
                                          int h1, int KB, const float *&sa0, const float *&sa1, const float *&sw0,
                                          const float *&sw1) {
    const float *as = (const float *)a.A_scales;
    const int q0 = rA < nr ? (G1 ? a.sorted[r0 + rA] / a.K : r0 + rA) : -1;
    const int q1 = rA + 8 < nr ? (G1 ? a.sorted[r0 + rA + 8] / a.K : r0 + rA + 8) : -1;
    sa0 = q0 >= 0 ? as + (int64_t)q0 * KB : nullptr;
    sa1 = q1 >= 0 ? as + (int64_t)q1 * KB : nullptr;
    const float *ws = (const float *)a.W_scales + e * (a.N / 128) * KB;
    sw0 = ws + (h0 / 128) * KB;
    sw1 = ws + (h1 / 128) * KB;
}

/* acc += t * the block scales (fp8_block: f00/f01 for row rA's gate/up halves, f10/f11 for
 * rA + 8) or acc += t (fp8). */
template <bool BLOCK>
__device__ __forceinline__ void qg_add(float (&acc)[64], const float (&t)[64], float f00, float f01, float f10,
                                       float f11) {
#pragma unroll
    for (int j = 0; j < 16; j++) {
        if (BLOCK) {
            const float fa = j < 8 ? f00 : f01, fb = j < 8 ? f10 : f11;
            acc[4 * j] += t[4 * j] * fa;
            acc[4 * j + 1] += t[4 * j + 1] * fa;
            acc[4 * j + 2] += t[4 * j + 2] * fb;
            acc[4 * j + 3] += t[4 * j + 3] * fb;
        } else {
#pragma unroll
            for (int q = 0; q < 4; q++) acc[4 * j + q] += t[4 * j + q];
        }
    }
}

/* Epilogue: acc[4j + q] is row rA (+8 for q >= 2), tile column 8j + c2 (+1 for odd q); ts the
 * per-tensor scale (1 for fp8_block). */
template <bool G1>
__device__ __forceinline__ void qg_epi(const moe__fq_gemm_args &a, const float (&acc)[64], float ts, bool gated,
                                       int rA, int c2, int r0, int nr, int64_t e, int h0) {
    const float *bias = a.bias ? a.bias + e * a.N : nullptr;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = rA + hf * 8;
        if (r >= nr) continue;
        const int p = a.sorted[r0 + r];
        if (G1) {
            const float c1 = a.llama4 ? a.wts[p] : 1.0f;
            uint16_t *orow = a.inter + (int64_t)(r0 + r) * a.I;
            if (gated) {
                moe__fm_act_at(a.act, [&](auto ak) {
#pragma unroll
                    for (int j = 0; j < 8; j++)
                        moe__fq_epi_gated2<decltype(ak)::v>(a, orow, bias, h0 + 8 * j + c2, acc[4 * j + 2 * hf],
                                                            acc[4 * j + 2 * hf + 1], acc[4 * j + 32 + 2 * hf],
                                                            acc[4 * j + 33 + 2 * hf], ts, c1);
                });
            } else {
#pragma unroll
                for (int j = 0; j < 16; j++)
                    moe__fq_epi_relu2_2(a, orow, bias, h0 + 8 * j + c2, acc[4 * j + 2 * hf], acc[4 * j + 2 * hf + 1],
                                        ts, c1);
            }
        } else {
            const float wt = a.llama4 ? 1.0f : a.wts[p];
            float *yrow = a.y + (int64_t)p * a.N;
#pragma unroll
            for (int j = 0; j < 16; j++)
                moe__fq_epi_down2(yrow, bias, h0 + 8 * j + c2, acc[4 * j + 2 * hf], acc[4 * j + 2 * hf + 1], ts, wt);
        }
    }
}
#endif

/* ------------------------------------------------ exact kernel (default) -- */

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
/* Weight row (within the expert's N) of row r of the B tile: rows 0-63 the first half, 64-127
 * the second. */
__device__ __forceinline__ int qg_brow(int r, int h0, int h1) { return r < 64 ? h0 + r : h1 + r - 64; }

/* The 4-bit modes' consumers load the scale codes of the next stage while this one multiplies:
 * the scale code of chunk c = (row c / 4, columns 16 (c % 4)) of stage kt of item (e, h0, h1)
 * (nvfp4: e4m3 per 16, mxfp4: ue8m0 per 32, mxint4: bf16 per 32; 0 for chunks past the tile). */
template <int MODE>
__device__ __forceinline__ uint32_t qg_wscale(const moe__fq_gemm_args &a, int64_t e, int h0, int h1, int kt, int c) {
    const int r = c >> 2, q = c & 3;
    const int64_t row = e * a.N + qg_brow(r, h0, h1);
    if (MODE == MOE_QUANT_NVFP4) return __ldg((const uint8_t *)a.W_scales + row * (a.Kd / 16) + kt * 4 + q);
    if (MODE == MOE_QUANT_MXFP4) return __ldg((const uint8_t *)a.W_scales + row * (a.Kd / 32) + kt * 2 + (q >> 1));
    return __ldg((const uint16_t *)a.W_scales + row * (a.Kd / 32) + kt * 2 + (q >> 1));
}

/* mxint4: acc += t x the weight scale of each accumulator column (sc: f32 [128] of the 32-column
 * group, by tile column). */
__device__ __forceinline__ void qg_add_col(float (&acc)[64], const float (&t)[64], const float *sc, int c2) {
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const float2 f = *(const float2 *)(sc + 8 * j + c2);
        acc[4 * j] += t[4 * j] * f.x;
        acc[4 * j + 1] += t[4 * j + 1] * f.y;
        acc[4 * j + 2] += t[4 * j + 2] * f.x;
        acc[4 * j + 3] += t[4 * j + 3] * f.y;
    }
}
/* Consumer-side widening (the 4-bit modes): each of the 256 consumer threads widens chunks ct and
 * ct + 256 of a stage (chunk c = row c / 4, columns 16 (c % 4)): 8 code bytes each from B8s, the
 * scale codes in sc (loaded a stage ahead), bf16 into the swizzled Bfs; mxint4 also stores the
 * chunk's bf16 scale as f32 into Scs [2 groups][128 rows]. */
template <int MODE>
__device__ __forceinline__ void qg_widen(const uint8_t *B8s, uint16_t *Bfs, float *Scs, int ct, const uint32_t (&sc)[2]) {
    constexpr int CB = qx_cfg<MODE>::CB;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int c = ct + 256 * i, r = c >> 2, q = c & 3;
        const uint2 v = *(const uint2 *)(B8s + r * CB + q * 8);
        const uint32_t s2 = moe__fq_scale2<MODE>(sc[i]);
        *(uint4 *)(Bfs + moe__fm_swz(r, 2 * q)) = moe__fq_w4x8_bf16<MODE != MOE_QUANT_MXINT4>(v.x, s2);
        *(uint4 *)(Bfs + moe__fm_swz(r, 2 * q + 1)) = moe__fq_w4x8_bf16<MODE != MOE_QUANT_MXINT4>(v.y, s2);
        if (MODE == MOE_QUANT_MXINT4 && !(q & 1)) Scs[(q >> 1) * QG_BN + r] = __uint_as_float(sc[i] << 16);
    }
}

/* Named barrier of the 256 consumer threads (id 1). */
__device__ __forceinline__ void qg_consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
#endif

template <int MODE, bool G1>
__global__ void __launch_bounds__(384, 1)
    k_qg_exact(const moe__fq_gemm_args a, const __grid_constant__ CUtensorMap tmw, const __grid_constant__ CUtensorMap tma) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using C = qx_cfg<MODE>;
    constexpr int BM = QG_BM, BN = QG_BN, BK = QX_BK, S = C::S, CB = C::CB;
    constexpr bool BLOCK = MODE == MOE_QUANT_FP8_BLOCK, W4 = C::W4, INT4 = C::INT4;
    constexpr bool BF = W4; /* bf16 MMAs for the 4-bit modes (activations bf16), f16 for fp8 */
    /* who widens the weights: converter warps 1-3 for fp8 / fp8_block (their e4m3 -> f16 is 12
     * instructions a chunk; widening in the consumers measured 7-15% slower), the consumers for
     * the 4-bit modes (~70 instructions a chunk: three converter warps took 1.3-1.6x longer) */
    constexpr bool CW = W4;
    extern __shared__ unsigned char qg_raw[];
    uint16_t *As = (uint16_t *)(((uintptr_t)qg_raw + 1023) & ~(uintptr_t)1023); /* 16-bit [S][BM][BK] */
    uint16_t *Bf = As + S * BM * BK;                                              /* 16-bit [S][BN][BK] */
    uint8_t *B8 = (uint8_t *)(Bf + S * BN * BK);                                  /* codes [S][BN][CB] */
    float *Sc = (float *)(B8 + S * BN * CB); /* mxint4: weight scales [S][2][BN] */
    /* full[s] (bulk copies landed) at bar0 + 8s, conv[s] (B widened) + 8(S + s), empty[s] + 8(2S + s) */
    const uint32_t bar0 = moe__fm_smem((uint8_t *)Sc + S * C::SC);
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            moe__fm_mbar_init(bar0 + 8 * s, 1);            /* the producer's expect_tx arrival */
            moe__fm_mbar_init(bar0 + 8 * (S + s), QX_CONV); /* every converter thread */
            moe__fm_mbar_init(bar0 + 8 * (2 * S + s), 8);  /* one per consumer warp */
        }
        moe__fm_mbar_init_fence();
    }
    __syncthreads();
    const qg_grid gr = qg_grid_of<G1, BK>(a);

    if (tid < 128) {
        /* converters: 3 chunks of codes in flight, 18 offsets; the 4-bit modes have none (the
         * consumers widen their weights; mxint4's need 232 registers) */
        if (CW) moe__fm_setmaxnreg_dec<40>();
        else moe__fm_setmaxnreg_dec<72>();
        if (tid == 0) {
            /* ---------------- producer: A 16-bit and B codes by bulk tensor copy ---------------- */
            qg_produce<S, CB, BK>(a, &tmw, &tma, gr, bar0, bar0 + 8 * 2 * S, moe__fm_smem(B8), moe__fm_smem(As),
                                  BM * BK * 2);
        } else if (!CW && tid >= 32) {
            /* ------------- converters (warps 1-3; fp8 / fp8_block): e4m3 codes -> f16, swizzled ------------- */
            constexpr int NCH = BN * BK / 16, PER = (NCH + QX_CONV - 1) / QX_CONV; /* 16-code chunks */
            const int cv = tid - 32;
            const bool last = cv + (PER - 1) * QX_CONV < NCH; /* warp-uniform */
            int it = 0;
            /* this thread's chunks c = cv + 96 i (row c / 4, columns 16 (c % 4)): the same
             * every stage, so their shared-memory offsets are computed once */
            int so[PER], d0[PER], d1[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int c = cv + i * QX_CONV, r = c >> 2, q = c & 3;
                so[i] = r * BK + q * 16;
                d0[i] = moe__fm_swz(r, 2 * q);
                d1[i] = moe__fm_swz(r, 2 * q + 1);
            }
            for (int64_t w = blockIdx.x; w < gr.total; w += gridDim.x) {
                for (int kt = 0; kt < gr.KT; kt++, it++) {
                    const int s = it % S;
                    moe__fm_mbar_wait(bar0 + 8 * s, (it / S) & 1);
                    const uint8_t *src = B8 + s * BN * CB;
                    uint16_t *dst = Bf + s * BN * BK;
#pragma unroll
                    for (int b0 = 0; b0 < PER; b0 += 3) { /* 3 chunks in flight a thread */
                        uint4 v[3];
#pragma unroll
                        for (int i = 0; i < 3; i++)
                            if (b0 + i < PER - 1 || last) v[i] = *(const uint4 *)(src + so[b0 + i]);
#pragma unroll
                        for (int i = 0; i < 3; i++) {
                            if (!(b0 + i < PER - 1 || last)) continue;
                            uint32_t o[8];
                            moe__fq_e4m3x4_f16(v[i].x, o[0], o[1]);
                            moe__fq_e4m3x4_f16(v[i].y, o[2], o[3]);
                            moe__fq_e4m3x4_f16(v[i].z, o[4], o[5]);
                            moe__fq_e4m3x4_f16(v[i].w, o[6], o[7]);
                            *(uint4 *)(dst + d0[b0 + i]) = make_uint4(o[0], o[1], o[2], o[3]);
                            *(uint4 *)(dst + d1[b0 + i]) = make_uint4(o[4], o[5], o[6], o[7]);
                        }
                    }
                    moe__fm_fence_async(); /* our shared writes, before the consumers' wgmma reads */
                    moe__fm_mbar_arrive(bar0 + 8 * (S + s));
                }
            }
        }
        __syncwarp();
    } else {
        /* ---------------- consumers ---------------- */
        if (CW) moe__fm_setmaxnreg_inc<232>();
        else moe__fm_setmaxnreg_inc<216>();
        const int ct = tid - 128, lane = tid & 31, wg = ct >> 7, w4 = (ct >> 5) & 3;
        const int c2 = (lane & 3) * 2, rA = wg * 64 + w4 * 16 + (lane >> 2); /* rows rA, rA + 8 */
        int it = 0;
        float acc[64], tmp[64];
        float t1[64]; /* mxint4 only */
        /* 4-bit: the next stage to widen (stage counter ic: item wc, its work qc, K step kc; its
         * scale codes in scl, loaded a stage ahead); widened while the previous stage multiplies */
        int64_t wc = blockIdx.x;
        int kc = 0, ic = 0;
        qg_work qc = {0, 0, 0, 0, 0};
        uint32_t scl[2] = {0, 0};
        auto load_sc = [&]() {
            if (W4 && wc < gr.total) {
#pragma unroll
                for (int i = 0; i < 2; i++) scl[i] = qg_wscale<MODE>(a, qc.e, qc.h0, qc.h1, kc, ct + 256 * i);
            }
        };
        auto widen = [&]() { /* all consumers at once: uniform */
            if (wc >= gr.total) return;
            const int s = ic % S;
            moe__fm_mbar_wait(bar0 + 8 * s, (ic / S) & 1);
            qg_widen<MODE>(B8 + s * BN * CB, Bf + s * BN * BK, Sc + s * 2 * BN, ct, scl);
            moe__fm_fence_async(); /* our shared writes, before the wgmma reads */
            ic++;
            if (++kc == gr.KT) {
                kc = 0;
                wc += gridDim.x;
                if (wc < gr.total) qc = qg_work_of(a, gr, wc);
            }
            load_sc();
        };
        if (CW) {
            if (wc < gr.total) qc = qg_work_of(a, gr, wc);
            load_sc();
            widen();
            qg_consumers_sync();
        }
        for (int64_t w = blockIdx.x; w < gr.total; w += gridDim.x) {
            const qg_work q = qg_work_of(a, gr, w);
            const int r0 = q.r0, nr = q.nr, h0 = q.h0, h1 = q.h1;
            const int64_t e = q.e;
            const float *sa0 = nullptr, *sa1 = nullptr, *sw0 = nullptr, *sw1 = nullptr;
            if (BLOCK) qg_scales<G1>(a, rA, r0, nr, e, h0, h1, a.Kd / 128, sa0, sa1, sw0, sw1);
#pragma unroll
            for (int i = 0; i < 64; i++) acc[i] = 0.0f;
            for (int kt = 0; kt < gr.KT; kt++, it++) {
                const int s = it % S;
                float x0 = 0, x1 = 0, g = 0, u = 0;
                if (BLOCK && (kt & 1)) { /* the 128-column block ends here: loaded now, used after the MMAs */
                    const int kb = kt >> 1;
                    x0 = sa0 ? sa0[kb] : 0.0f;
                    x1 = sa1 ? sa1[kb] : 0.0f;
                    g = sw0[kb];
                    u = sw1[kb];
                }
                moe__fm_mbar_wait(bar0 + 8 * s, (it / S) & 1);
                if (!CW) moe__fm_mbar_wait(bar0 + 8 * (S + s), (it / S) & 1);
                const uint64_t da = moe__fm_desc(moe__fm_smem(As + s * BM * BK + wg * 64 * BK));
                const uint64_t db = moe__fm_desc(moe__fm_smem(Bf + s * BN * BK));
                moe__fm_wg_fence();
                if (INT4) {
                    /* per 32-column group: its two k16 MMAs into tmp / t1 from zero, then added
                     * times the weight scale of each column; both groups drained within the
                     * stage (a group left in flight across iterations made ptxas serialise every
                     * wgmma of the kernel: warning C7514) */
                    qg_wgmma_16<BF>(tmp, da, db, 0);
                    qg_wgmma_16<BF>(tmp, da + 2, db + 2, 1);
                    moe__fm_wg_commit();
                    qg_wgmma_16<BF>(t1, da + 4, db + 4, 0);
                    qg_wgmma_16<BF>(t1, da + 6, db + 6, 1);
                    moe__fm_wg_commit();
                    widen();
                    moe__fm_wg_wait1();
                    qg_add_col(acc, tmp, Sc + (s * 2) * BN, c2);
                    moe__fm_wg_wait0();
                    qg_add_col(acc, t1, Sc + (s * 2 + 1) * BN, c2);
                    __syncwarp();
                    if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (2 * S + s));
                    qg_consumers_sync();
                } else if (BLOCK) {
#pragma unroll
                    for (int ks = 0; ks < BK / 16; ks++)
                        qg_wgmma_16<BF>(tmp, da + 2 * ks, db + 2 * ks, (kt & 1) | ks);
                    moe__fm_wg_commit();
                    if (CW) widen();
                    moe__fm_wg_wait0();
                    if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (2 * S + s));
                    if (kt & 1) qg_add<true>(acc, tmp, x0 * g, x0 * u, x1 * g, x1 * u);
                    if (CW) qg_consumers_sync();
                } else {
#pragma unroll
                    for (int ks = 0; ks < BK / 16; ks++) qg_wgmma_16<BF>(acc, da + 2 * ks, db + 2 * ks, 1);
                    moe__fm_wg_commit();
                    if (CW) widen();
                    moe__fm_wg_wait1();
                    if (kt > 0 && lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (2 * S + (it - 1) % S));
                    if (CW) qg_consumers_sync(); /* the next stage widened by everyone */
                }
            }
            if (!INT4 && !BLOCK) {
                moe__fm_wg_wait0();
                if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (2 * S + (it - 1) % S));
            }
            const float ts = (MODE == MOE_QUANT_FP8 || MODE == MOE_QUANT_NVFP4) ? a.A_tensor[0] * a.W_tensor[e] : 1.0f;
            qg_epi<G1>(a, acc, ts, gr.gated, rA, c2, r0, nr, e, h0);
        }
    }
#endif
}

/* -------------------------------------- fp8 tensor cores (MOE_FUSED_FP8MMA=1) -- */

template <int MODE, bool G1>
__global__ void __launch_bounds__(384, 1)
    k_qg_fp8(const moe__fq_gemm_args a, const __grid_constant__ CUtensorMap tmw, const __grid_constant__ CUtensorMap tma) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BM = QG_BM, BN = QG_BN, BK = Q8_BK, S = Q8_S;
    constexpr bool BLOCK = MODE == MOE_QUANT_FP8_BLOCK;
    extern __shared__ unsigned char qg_raw[];
    uint8_t *As = (uint8_t *)(((uintptr_t)qg_raw + 1023) & ~(uintptr_t)1023);
    uint8_t *Bs = As + S * BM * BK;
    const uint32_t bar0 = moe__fm_smem(Bs + S * BN * BK); /* full[s] at bar0 + 8s, empty[s] at bar0 + 8(S + s) */
    const int tid = threadIdx.x;
    qg_bars2<S>(bar0);
    const qg_grid gr = qg_grid_of<G1, BK>(a);

    if (tid < 128) {
        qg_producer_wg<S, BK, BK>(a, &tmw, &tma, gr, bar0, moe__fm_smem(Bs), moe__fm_smem(As), BM * BK);
    } else {
        moe__fm_setmaxnreg_inc<232>();
        const int ct = tid - 128, lane = tid & 31, wg = ct >> 7, w4 = (ct >> 5) & 3;
        const int c2 = (lane & 3) * 2, rA = wg * 64 + w4 * 16 + (lane >> 2);
        int it = 0;
        /* every k32 MMA starts from zero (t0 / t1 alternate, one in flight while the other is
         * added in f32 by the CUDA cores): the least the fp8 MMA's own summation can do */
        float acc[64], t0[64], t1[64];
        for (int64_t w = blockIdx.x; w < gr.total; w += gridDim.x) {
            const qg_work q = qg_work_of(a, gr, w);
            const int r0 = q.r0, nr = q.nr, h0 = q.h0, h1 = q.h1;
            const int64_t e = q.e;
            const float *sa0 = nullptr, *sa1 = nullptr, *sw0 = nullptr, *sw1 = nullptr;
            if (BLOCK) qg_scales<G1>(a, rA, r0, nr, e, h0, h1, gr.KT, sa0, sa1, sw0, sw1);
#pragma unroll
            for (int i = 0; i < 64; i++) acc[i] = 0.0f;
            for (int kt = 0; kt < gr.KT; kt++, it++) {
                const int s = it % S;
                float x0 = 1, x1 = 1, g = 1, u = 1;
                if (BLOCK) { /* loaded now, multiplied once the stage has landed */
                    x0 = sa0 ? sa0[kt] : 0.0f;
                    x1 = sa1 ? sa1[kt] : 0.0f;
                    g = sw0[kt];
                    u = sw1[kt];
                }
                moe__fm_mbar_wait(bar0 + 8 * s, (it / S) & 1);
                const float f00 = x0 * g, f01 = x0 * u, f10 = x1 * g, f11 = x1 * u;
                const uint64_t da = moe__fm_desc(moe__fm_smem(As + s * BM * BK + wg * 64 * BK));
                const uint64_t db = moe__fm_desc(moe__fm_smem(Bs + s * BN * BK));
                moe__fm_wg_fence();
                qg_wgmma_e4m3(t0, da, db, 0);
                moe__fm_wg_commit();
                qg_wgmma_e4m3(t1, da + 2, db + 2, 0);
                moe__fm_wg_commit();
                moe__fm_wg_wait1();
                qg_add<BLOCK>(acc, t0, f00, f01, f10, f11);
                moe__fm_wg_fence();
                qg_wgmma_e4m3(t0, da + 4, db + 4, 0);
                moe__fm_wg_commit();
                moe__fm_wg_wait1();
                qg_add<BLOCK>(acc, t1, f00, f01, f10, f11);
                moe__fm_wg_fence();
                qg_wgmma_e4m3(t1, da + 6, db + 6, 0);
                moe__fm_wg_commit();
                moe__fm_wg_wait1();
                qg_add<BLOCK>(acc, t0, f00, f01, f10, f11);
                moe__fm_wg_wait0();
                if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (S + s)); /* stage s read */
                qg_add<BLOCK>(acc, t1, f00, f01, f10, f11);
            }
            qg_epi<G1>(a, acc, BLOCK ? 1.0f : a.A_tensor[0] * a.W_tensor[e], gr.gated, rA, c2, r0, nr, e, h0);
        }
    }
#endif
}

/* ------------------------------------- register-operand kernel (4-bit modes) -- */

/* k_qg_rs (default for nvfp4, mxfp4, mxint4, fp8, and fp8_block from H = 4096; MOE_FUSED_QRS=0:
 * k_qg_exact, =1: k_qg_rs for every mode): the weights are the
 * register operand A of wgmma.m64n128k16 bf16 (64 weight rows a consumer warpgroup), the tokens
 * the shared-memory operand B (the 128-row A box of k_qg_exact, read by both warpgroups), so the
 * accumulator is transposed: rows = weight rows, columns = tokens.  Each consumer thread widens
 * its own fragment straight from the codes in shared memory: no widened tile is written, fenced
 * or read back.  Thread (warp w4, lane g * 4 + t) holds weight rows g and g + 8 of its warp's 16
 * (gated GEMM1: gate column c and its up row, so the activation stays in registers) and, of each
 * 32-column group, the 8 codes at columns 8t..8t+7 (one 32-bit word a row): the pairs
 * moe__fq_w4x8_pairs makes of a word, (element j, element j + 4), are its registers as they
 * come.  The k16 step ks (0, 1) of a group then multiplies, at position kk = 2t + i + 8h of
 * the step, column 8t + 2ks + h + 4i of the group, so the 16-bit token operand holds every
 * 32-column group in that order ("RS order", qr_pos); the kernels that write it
 * (k_qr_permute, k_qg_codes16<true, true>, GEMM1's epilogue for the mx modes) permute as they
 * write.  A 32-column group never mixes with another inside a k16 step, so mxint4 still
 * promotes each group's partial sums times its bf16 scale (now one scale a thread row) where it
 * does not run as MOE__FQ_I4F (f16 MMAs on int4 x the folded scale, no promotions).  nvfp4's
 * e4m3 and mxfp4's ue8m0 block scales are in the widened values, as in k_qg_exact.  nvfp4 runs
 * f16 MMAs (x and the intermediate as f16, e2m1 x e4m3 being exact in f16): its weights widen as
 * e2m1 x 2^-6 x the scale through the hardware's e4m3 conversion (moe__fq_e2m1x8_f16, two
 * thirds of the bf16 widening's instructions), the epilogue multiplying 2^6 back. */
constexpr int QR_S = 8; /* stages: A 16 KB + codes 4 KB (fp8 modes 8 KB) each */
/* fp8 / fp8_block (qg_variant: fp8 always, fp8_block from H = 4096): the weights' e4m3 codes
 * widened to f16 in registers; a thread's 16 codes of a 64-column stage row are one 16-byte word
 * (columns 16t .. 16t + 15), its pair m (columns 16t + 2m, + 1) multiplies at k16 step m / 2,
 * position 2t + 8 (m % 2) (+ 1), so the tokens come in "RS8 order" (qr_pos8; x by
 * k_qg_codes16<false, true>, the intermediate by GEMM1's epilogue); fp8_block promotes each
 * 128-column block's partial sums times the weight block scale of the row and the token's
 * activation scale (staged in shared memory a warpgroup) */
__host__ __device__ constexpr bool qr_f8(int mode) { return mode == MOE_QUANT_FP8 || mode == MOE_QUANT_FP8_BLOCK; }
constexpr size_t qr_smem(int mode) {
    return (size_t)QR_S * (QG_BM * QX_BK * 2 + QG_BN * (qr_f8(mode) ? QX_BK : QX_BK / 2)) + 1024 + 2 * QR_S * 8 +
           (mode == MOE_QUANT_FP8_BLOCK ? 4 * 2 * QG_BM * 4 : mode == MOE__FQ_I4F ? 2 * 2 * QG_BM * 4 : 0);
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
/* Position in RS order of column c of a row (the permutation stays inside c's 32-column group). */
__device__ __forceinline__ int qr_pos(int c) {
    const int e = c & 7, t = (c >> 3) & 3;
    return (c & ~31) | ((e >> 1) & 1) << 4 | t << 1 | e >> 2 | (e & 1) << 3;
}
/* Position in RS8 order (fp8 modes) of column c: inside its 64-column stage, column 16t + 2m + i
 * at 16 (m / 2) + 8 (m % 2) + 2t + i. */
__device__ __forceinline__ int qr_pos8(int c) {
    const int i = c & 1, m = (c >> 1) & 7, t = (c >> 4) & 3;
    return (c & ~63) | (m >> 1) << 4 | (m & 1) << 3 | t << 1 | i;
}

/* d (64 f32) = (scale_d ? d : 0) + A(64 x 16 bf16, registers a0-a3) * B(16 x 128 bf16, smem
 * desc, K-major, 128-byte swizzle); F16: f16 operands (the fp8 modes). */
#define QR_WGMMA(TY)                                                                                   \
    asm volatile(                                                                                     \
        "{\n"                                                                                         \
        ".reg .pred p;\n"                                                                             \
        "setp.ne.b32 p, %69, 0;\n"                                                                    \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                  \
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 0;\n" \
        "}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(scale_d))
template <bool F16 = false>
__device__ __forceinline__ void qr_wgmma(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint64_t db, int scale_d) {
    if (F16) QR_WGMMA("f16");
    else QR_WGMMA("bf16");
}
#undef QR_WGMMA

/* The 4-bit modes' scales, one 32-bit word a weight row and stage (qr_sword), turned into the
 * values the widening takes (qr_sconv) one stage ahead.  The word of row r at stage kt: nvfp4 the
 * e4m3 codes of the stage's four 16-column blocks (bytes of the row's scales at 4kt), mxfp4 the
 * ue8m0 codes of its two groups (low 16 bits), mxint4 its two groups' bf16 scales.  One load a
 * row and stage in place of one a row and group, and the word of a clamped stage (the last
 * stage's, past the end: never used) so that no predicate keeps the scale ring in moves. */
template <int MODE> __device__ __forceinline__ const uint8_t *qr_srow(const moe__fq_gemm_args &a, int64_t row) {
    return (const uint8_t *)a.W_scales + row * (MODE == MOE_QUANT_MXFP4 || MODE == MOE__FQ_F4S ? a.Kd / 32 : a.Kd / 16);
}
template <int MODE> __device__ __forceinline__ uint32_t qr_sword(const uint8_t *p, int kt, int KT) {
    const uint32_t k = (uint32_t)min(kt, KT - 1); /* unsigned: no sign extension for the address */
    if (MODE == MOE_QUANT_MXFP4 || MODE == MOE__FQ_F4S) return __ldg((const uint16_t *)(p + 2u * k));
    return __ldg((const uint32_t *)(p + 4u * k));
}
/* s[G]: what widens group G from a row's word wd: nvfp4 f16x2 (s, s) of the e4m3 code of this
 * thread's 16 columns (bytes nsel: 0 and 2 for threads t = 0, 1, else 1 and 3); mxfp4 bf16x2 (s, s)
 * of the ue8m0 code; mxint4 the bf16 scale as f32 bits (qr_add_rows promotes with it);
 * MOE__FQ_I4F f16x2 (s', s') of the scale times fold (exact where the fold is allowed). */
template <int MODE>
__device__ __forceinline__ void qr_sconv(uint32_t wd, uint32_t nsel, float fold, uint32_t (&s)[2]) {
    if constexpr (MODE == MOE_QUANT_NVFP4) {
        /* both codes to f16 in one conversion (exact), each then in both halves (the high pair unused) */
        uint32_t h2, unused;
        moe__fq_e4m3x4_f16(__byte_perm(wd, 0, nsel), h2, unused);
        (void)unused;
        s[0] = __byte_perm(h2, 0, 0x1010);
        s[1] = __byte_perm(h2, 0, 0x3232);
    } else if constexpr (MODE == MOE_QUANT_MXFP4) {
        s[0] = moe__fq_scale2<MODE>(wd & 0xFFu);
        s[1] = moe__fq_scale2<MODE>((wd >> 8) & 0xFFu);
    } else if constexpr (MODE == MOE__FQ_F4S) {
        /* bf16 2^(k - 1) = (k + 126) << 7 for both codes at once (k <= 128: no carry past a half) */
        const uint32_t b = ((__byte_perm(wd, 0, 0x4140) + 0x007E007Eu) << 7);
        s[0] = __byte_perm(b, 0, 0x1010);
        s[1] = __byte_perm(b, 0, 0x3232);
    } else if constexpr (MODE == MOE_QUANT_MXINT4) {
        s[0] = wd << 16;
        s[1] = wd & 0xFFFF0000u;
    } else if constexpr (MODE == MOE__FQ_I4F) {
        const float v0 = __uint_as_float(wd << 16) * fold, v1 = __uint_as_float(wd & 0xFFFF0000u) * fold;
        asm("cvt.rn.f16x2.f32 %0, %1, %1;\n" : "=r"(s[0]) : "f"(v0));
        asm("cvt.rn.f16x2.f32 %0, %1, %1;\n" : "=r"(s[1]) : "f"(v1));
    }
}

/* Widen group G of the stage at cb (codes [128 rows][32 bytes]) into f[G]: wo[G][row lo / hi] the
 * byte offsets of this thread's two words in the stage (qr_words), scales sc[row lo / hi][group]
 * (qr_sconv); mxint4's scales as f32 into pf[G]; MOE__FQ_I4F: int4 x (scale x fold) as f16.
 * fp8 modes (codes [128 rows][64 bytes]): G = 0 widens the whole stage (one 16-byte word a row:
 * pairs 0-3 into f[0], 4-7 into f[1]), G = 1 nothing. */
__device__ __forceinline__ void qr_words(const uint8_t *cb, const uint32_t (&wo)[2][2], int G, uint32_t &wl, uint32_t &wh);
template <int MODE>
__device__ __forceinline__ void qr_widen_w(uint32_t wl, uint32_t wh, int G, const uint32_t (&sc)[2][2],
                                           uint32_t (&f)[2][2][4], float (&pf)[2][2]);
template <int MODE>
__device__ __forceinline__ void qr_widen(const uint8_t *cb, const uint32_t (&wo)[2][2], int G, const uint32_t (&sc)[2][2],
                                         uint32_t (&f)[2][2][4], float (&pf)[2][2]) {
    if constexpr (qr_f8(MODE)) {
        if (G != 0) return;
        const uint32_t sb = moe__fm_smem(cb);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            uint32_t v0, v1, v2, v3;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                         : "r"(sb + wo[0][h]));
            moe__fq_e4m3x4_f16(v0, f[0][h][0], f[0][h][1]);
            moe__fq_e4m3x4_f16(v1, f[0][h][2], f[0][h][3]);
            moe__fq_e4m3x4_f16(v2, f[1][h][0], f[1][h][1]);
            moe__fq_e4m3x4_f16(v3, f[1][h][2], f[1][h][3]);
        }
        return;
    }
    uint32_t wl, wh;
    qr_words(cb, wo, G, wl, wh);
    qr_widen_w<MODE>(wl, wh, G, sc, f, pf);
}

/* The 4-bit modes' code words of group G of the stage at cb: this thread's row lo / hi words, at
 * byte offsets wo[G][0 / 1] (the kernel's, swizzle included: set once, so an address is the
 * stage's uniform base plus a register, no arithmetic a stage).  ld.shared: the aligned shared
 * pointer is integer arithmetic, and generic loads were what the compiler made of a plain
 * dereference. */
__device__ __forceinline__ void qr_words(const uint8_t *cb, const uint32_t (&wo)[2][2], int G, uint32_t &wl, uint32_t &wh) {
    const uint32_t sa = moe__fm_smem(cb);
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(wl) : "r"(sa + wo[G][0]));
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(wh) : "r"(sa + wo[G][1]));
}
/* qr_widen of the 4-bit modes from their words (qr_words). */
template <int MODE>
__device__ __forceinline__ void qr_widen_w(uint32_t wl, uint32_t wh, int G, const uint32_t (&sc)[2][2],
                                           uint32_t (&f)[2][2][4], float (&pf)[2][2]) {
    if constexpr (MODE == MOE__FQ_I4F) { /* int4 x the folded scale, f16 */
        moe__fq_i4x8_f16(wl, sc[0][G], f[G][0]);
        moe__fq_i4x8_f16(wh, sc[1][G], f[G][1]);
    } else if constexpr (MODE == MOE__FQ_F4S) { /* e2m1 x the scale in one multiply, bf16 */
        moe__fq_w4x8_pairs<true, true>(wl, sc[0][G], f[G][0]);
        moe__fq_w4x8_pairs<true, true>(wh, sc[1][G], f[G][1]);
    } else if constexpr (MODE == MOE_QUANT_NVFP4) { /* e2m1 x 2^-6 x the scale, f16 */
        moe__fq_e2m1x8_f16(wl, sc[0][G], f[G][0]);
        moe__fq_e2m1x8_f16(wh, sc[1][G], f[G][1]);
    } else if constexpr (MODE == MOE_QUANT_MXINT4) { /* int4, the scale promoted */
        moe__fq_w4x8_pairs<false>(wl, 0u, f[G][0]);
        moe__fq_w4x8_pairs<false>(wh, 0u, f[G][1]);
        pf[G][0] = __uint_as_float(sc[0][G]);
        pf[G][1] = __uint_as_float(sc[1][G]);
    } else {
        moe__fq_w4x8_pairs<true>(wl, sc[0][G], f[G][0]);
        moe__fq_w4x8_pairs<true>(wh, sc[1][G], f[G][1]);
    }
}

/* The two k16 steps of group G (f: its registers) on the tokens at descriptor db (the group's
 * first step). */
template <bool F16 = false>
__device__ __forceinline__ void qr_group(float (&d)[64], const uint32_t (&f)[2][4], uint64_t db, int scale_d) {
    qr_wgmma<F16>(d, f[0][0], f[1][0], f[0][1], f[1][1], db, scale_d);
    qr_wgmma<F16>(d, f[0][2], f[1][2], f[0][3], f[1][3], db + 2, 1);
}

/* max(m, |v|), NaN if either is (m >= 0). */
__device__ __forceinline__ float qr_absmax(float m, float v) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(m), "f"(fabsf(v)));
    return r;
}

/* mxint4: acc += t x the weight scale of each accumulator row (s0: row lo, s1: row hi). */
__device__ __forceinline__ void qr_add_rows(float (&acc)[64], const float (&t)[64], float s0, float s1) {
#pragma unroll
    for (int j = 0; j < 16; j++) {
        acc[4 * j] += t[4 * j] * s0;
        acc[4 * j + 1] += t[4 * j + 1] * s0;
        acc[4 * j + 2] += t[4 * j + 2] * s1;
        acc[4 * j + 3] += t[4 * j + 3] * s1;
    }
}
#endif

/* PP (fp8_block; MOE_FUSED_FBPP=0: false): the two consumer warpgroups take turns issuing each
 * 128-column block's MMAs (ping-pong), so one drains and promotes its partial sums while the
 * other's MMAs run; false: both issue at will, in step, and drain at the same time. */
template <int MODE, bool G1, bool PP = false>
__global__ void __launch_bounds__(384, 1)
    k_qg_rs(const moe__fq_gemm_args a, const __grid_constant__ CUtensorMap tmw, const __grid_constant__ CUtensorMap tma) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr bool F8 = qr_f8(MODE), BLOCK = MODE == MOE_QUANT_FP8_BLOCK;
    static_assert(!PP || BLOCK, "the ping-pong turns are fp8_block's");
    constexpr int BM = QG_BM, BN = QG_BN, BK = QX_BK, S = QR_S, CB = F8 ? QX_BK : QX_BK / 2;
    constexpr bool INT4 = MODE == MOE_QUANT_MXINT4, I4F = MODE == MOE__FQ_I4F;
    constexpr bool HM = F8 || I4F || MODE == MOE_QUANT_NVFP4; /* f16 MMAs */
    /* GEMM1 of the mx modes writes the intermediate in RS order, of the fp8 modes in RS8 order
     * (GEMM2 reads it as it is; the fp8 modes' quantisers keep the order: per tensor, or per 128
     * columns, which the permutation does not cross; I4F's row scaling is element-wise) */
    constexpr bool PERM_OUT = G1 && (MODE == MOE_QUANT_MXFP4 || MODE == MOE__FQ_F4S || MODE == MOE_QUANT_MXINT4 || I4F || F8);
    /* GEMM1 of nvfp4 takes the intermediate's amax (its global scale) as it writes it */
    constexpr bool AMAX = G1 && MODE == MOE_QUANT_NVFP4;
    extern __shared__ unsigned char qg_raw[];
    uint16_t *As = (uint16_t *)(((uintptr_t)qg_raw + 1023) & ~(uintptr_t)1023); /* tokens 16-bit [S][BM][BK] */
    uint8_t *B8 = (uint8_t *)(As + S * BM * BK);                                  /* codes [S][BN][CB] */
    /* fp8_block: activation scales [warpgroup][2][128 tokens], then (PP, GEMM2) the tokens' pairs
     * and routing weights [warpgroup][2][128]; I4F: the token rows' 2^-a, as fp8_block's scales */
    float *Sx = (float *)(B8 + S * BN * CB);
    const uint32_t bar0 = moe__fm_smem(Sx + (BLOCK ? 4 * 2 * BM : I4F ? 2 * 2 * BM : 0)); /* full[s] at bar0 + 8s, empty[s] + 8(S + s) */
    const int tid = threadIdx.x;
    qg_bars2<S>(bar0);
    const qg_grid gr = qg_grid_of<G1, BK>(a);

    if (tid < 128) {
        qg_producer_wg<S, CB, BK>(a, &tmw, &tma, gr, bar0, moe__fm_smem(B8), moe__fm_smem(As), BM * BK * 2);
    } else {
        moe__fm_setmaxnreg_inc<232>();
        const int ct = tid - 128, lane = tid & 31, wg = ct >> 7, w4 = (ct >> 5) & 3;
        const int g = lane >> 2, t = lane & 3, c2 = t * 2;
        /* this thread's two rows of the 128-row weight tile (0-63 the first half) */
        const int rl = gr.gated ? 32 * wg + 8 * w4 + g : 64 * wg + 16 * w4 + g;
        const int rh = gr.gated ? 64 + rl : rl + 8;
        /* byte offsets of this thread's words in a stage's two rows (fp8 modes: 16 bytes at 16t) */
        const int ol = rl * CB + (F8 ? 16 : 4) * t, oh = rh * CB + (F8 ? 16 : 4) * t;
        /* the 4-bit modes' codes come with the 32-byte swizzle (a.W_swz; rows rl and rh agree in
         * bit 2): a warp's words of a group then fill the 32 banks once, where without it rows g
         * and g + 4 met in every bank (two wavefronts a load) */
        const int sw = !F8 && a.W_swz ? ((rl >> 2) & 1) << 4 : 0;
        /* wo[G][lo / hi]: the stage offsets of this thread's words of group G (4-bit modes: sw
         * swaps the row's two 16-byte halves; fp8 modes: the 16-byte words, G = 0 only) */
        uint32_t wo[2][2];
#pragma unroll
        for (int G = 0; G < 2; G++) {
            wo[G][0] = ol + (F8 ? 0 : 16 * G ^ sw);
            wo[G][1] = oh + (F8 ? 0 : 16 * G ^ sw);
        }
        /* the stage counter: unsigned, so the stage index and phase (it % S, it / S) are a mask and
         * a shift (fewer instructions a stage); fp8_block's ping-pong keeps it signed (its GEMM1 was
         * 2% slower unsigned: DeepSeek-V3 T = 4096, Nsight) */
        std::conditional_t<PP, int, uint32_t> it = 0;
        int bc = 0; /* fp8_block: 128-column blocks done by this thread, I4F: items (its Sx slot's parity) */
        float acc[64];
        /* mxint4: the two groups' partial sums; fp8_block: ta the 128-column block's */
        float ta[INT4 || BLOCK ? 64 : 1], tb[INT4 ? 64 : 1];
        uint32_t f[2][2][4]; /* [group][row lo / hi][pair]: the fragments of the stage to multiply next */
        uint32_t f2[INT4 ? 1 : 2][2][4]; /* the fp4 and fp8 modes' second set */
        float pf[2][2] = {{0, 0}, {0, 0}};
        /* the scales of the stage to widen next (scA, qr_sconv's) and the scale words (qr_sword) of
         * the SD - 1 after it (ring): step kt loads stage kt + SD's, widened at step kt + SD - 1 (fp4
         * modes SD = 3: with 2, Nsight showed the widening waiting on them; mxint4 2, for registers;
         * the fp8 modes have none) */
        constexpr int SD = INT4 || F8 ? 2 : 3;
        uint32_t scA[2][2], ring[SD - 1][2] = {};
        const uint32_t nsel = (t & 2) ? 0x31u : 0x20u; /* nvfp4: the bytes of this thread's two block codes */
        /* AMAX: the largest |value| this thread wrote, before its bf16 rounding (monotonic and odd, so
         * the rounding of the largest |f32| is the largest |bf16|); a NaN stays (max.NaN) */
        float amx = 0.0f;
        if (PP && wg == 1) asm volatile("bar.arrive 4, 256;\n" ::: "memory"); /* warpgroup 0's first turn */
        for (int64_t w = blockIdx.x; w < gr.total; w += gridDim.x) {
            const qg_work q = qg_work_of(a, gr, w);
            const int r0 = q.r0, nr = q.nr, h0 = q.h0, h1 = q.h1;
            const int64_t e = q.e;
            /* this thread's two weight rows: within the expert (cl, ch: the epilogue's columns) and
             * in the whole weight tensor (wl, wh: the scale-code rows) */
            const int cl = qg_brow(rl, h0, h1), ch = qg_brow(rh, h0, h1);
            const int64_t wl = e * a.N + cl, wh = e * a.N + ch;
            /* the epilogue's scalars, loaded now so their latency hides under the MMAs: the
             * per-tensor scale, the biases of this thread's rows, and (GEMM2 of the fp4 modes; the
             * mxint4 kernel has no registers to spare) the pair and routing weight of each of its 32
             * token columns */
            /* nvfp4: times 2^6, the weights' factor (moe__fq_e2m1x8_f16; exact, so the same bits) */
            const float ts = MODE == MOE_QUANT_NVFP4 ? a.A_tensor[0] * a.W_tensor[e] * 64.0f
                             : MODE == MOE_QUANT_FP8 ? a.A_tensor[0] * a.W_tensor[e]
                             : I4F                   ? a.W_unfold
                                                     : 1.0f;
            const float *bias = a.bias ? a.bias + e * a.N : nullptr;
            const float bl = bias ? bias[cl] : 0.0f, bh = bias ? bias[ch] : 0.0f;
            int pp[G1 ? 1 : 32];
            float wt[G1 ? 1 : 32];
            /* I4F: thread tk of a warpgroup stores token tk's 2^-a into the warpgroup's slot (slots
             * alternate by item; the epilogue reads them after a warpgroup barrier), so the 32 of a
             * thread's token columns cost no registers while the MMAs run (in registers GEMM1 took
             * 10% longer than mxfp4's) */
            const float *xr = nullptr;
            if constexpr (I4F) {
                const int tk = ct & 127;
                float *slot = Sx + wg * 2 * BM + (bc & 1) * BM;
                slot[tk] = tk < nr ? __ldg(a.A_rows + r0 + tk) : 0.0f;
                xr = slot;
                bc++;
            }
            auto load_pairs = [&]() {
                /* all loaded before any store: the stores may alias the tables for all the
                 * compiler knows, so loads between them would each wait a round trip (measured:
                 * GEMM2's epilogue then took as long as its MMAs at Qwen3-30B-A3B T = 4096) */
                if constexpr (!G1 && PP) { /* from the warpgroup's table (the block loop's end) */
                    const uint32_t tb = moe__fm_smem(Sx + 2 * 2 * BM + wg * 2 * BM);
#pragma unroll
                    for (int k = 0; k < 32; k++) {
                        const int r = 8 * (k >> 1) + c2 + (k & 1);
                        asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(pp[k]) : "r"(tb + 4 * r));
                        asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(wt[k]) : "r"(tb + 4 * (BM + r)));
                    }
                } else if constexpr (!G1) {
#pragma unroll
                    for (int k = 0; k < 32; k++) {
                        const int r = 8 * (k >> 1) + c2 + (k & 1);
                        pp[k] = r < nr ? __ldg(a.sorted + r0 + r) : 0;
                    }
#pragma unroll
                    for (int k = 0; k < 32; k++) wt[k] = a.llama4 ? 1.0f : __ldg(a.wts + pp[k]);
                }
            };
            if (!INT4 && !BLOCK) load_pairs();
#pragma unroll
            for (int i = 0; i < 64; i++) acc[i] = 0.0f;
            /* stage 0 widened now (its scales loaded first), stage 1's scales in flight (KT >= 2:
             * Kd is a multiple of 128) */
            const uint8_t *srow[2] = {nullptr, nullptr};
            if constexpr (!F8) {
                srow[0] = qr_srow<MODE>(a, wl);
                srow[1] = qr_srow<MODE>(a, wh);
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    qr_sconv<MODE>(qr_sword<MODE>(srow[h], 0, gr.KT), nsel, a.W_fold, scA[h]);
#pragma unroll
                    for (int d = 1; d < SD; d++) ring[d - 1][h] = qr_sword<MODE>(srow[h], d, gr.KT);
                }
            }
            moe__fm_mbar_wait(bar0 + 8 * (it % S), (it / S) & 1);
            qr_widen<MODE>(B8 + (it % S) * BN * CB, wo, 0, scA, f, pf);
            qr_widen<MODE>(B8 + (it % S) * BN * CB, wo, 1, scA, f, pf);
            /* at stage kt: scA <- stage kt + 1's scales (to widen it), stage kt + SD's word loaded */
            auto next_scales = [&](int kt) {
                if constexpr (!F8) {
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        qr_sconv<MODE>(ring[0][h], nsel, a.W_fold, scA[h]);
#pragma unroll
                        for (int d = 0; d + 1 < SD - 1; d++) ring[d][h] = ring[d + 1][h];
                        ring[SD - 2][h] = qr_sword<MODE>(srow[h], kt + SD, gr.KT);
                    }
                }
            };
            /* mxint4 on f16 MMAs (MID): the next stage's code words are loaded before the scale
             * ring turns, so the turn (and its loads) fills their shared-memory latency; the first
             * use of a word was its top stall (Nsight source counters, Qwen3 T = 4096; mxfp4's
             * ue8m0 conversion already fills it, and it was 3% slower so).  nvfp4 took this order
             * too until its codes came with the 32-byte swizzle; since, its GEMM1 is the same
             * either way and its GEMM2 1.6% faster without (Qwen3 T = 4096: 411 / 414 against
             * 420 / 421 us, two trees).  The last stage of an item skips the turn: the next item
             * reloads the ring. */
            constexpr bool MID = I4F;
            /* two fragment sets (fp4 and fp8 modes): stage kt's MMAs (into d; the first from zero
             * unless sd) stay in flight while stage kt + 1 is widened into the other set, whose MMAs
             * (kt - 1) the wait has retired; KT is even */
            auto step = [&](int kt, const uint32_t (&cur)[2][2][4], uint32_t (&nxt)[2][2][4], float (&d)[64], int sd) {
                const int s = it % S;
                if (!MID) next_scales(kt);
                const uint64_t db = moe__fm_desc(moe__fm_smem(As + s * BM * BK));
                moe__fm_wg_fence();
                qr_group<HM>(d, cur[0], db, sd);
                qr_group<HM>(d, cur[1], db + 4, 1);
                moe__fm_wg_commit();
                moe__fm_wg_wait1(); /* stage kt - 1's MMAs done */
                __syncwarp();
                if (kt > 0 && lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (S + (it + S - 1) % S));
                if (kt + 1 < gr.KT) {
                    const int sn = (it + 1) % S;
                    moe__fm_mbar_wait(bar0 + 8 * sn, ((it + 1) / S) & 1);
                    if constexpr (MID) {
                        /* the code words requested first, the scale ring's turn (and the loads of
                         * stage kt + SD's scales) made while they come */
                        uint32_t w[2][2];
                        qr_words(B8 + sn * BN * CB, wo, 0, w[0][0], w[0][1]);
                        qr_words(B8 + sn * BN * CB, wo, 1, w[1][0], w[1][1]);
                        next_scales(kt);
                        qr_widen_w<MODE>(w[0][0], w[0][1], 0, scA, nxt, pf);
                        qr_widen_w<MODE>(w[1][0], w[1][1], 1, scA, nxt, pf);
                    } else {
                        qr_widen<MODE>(B8 + sn * BN * CB, wo, 0, scA, nxt, pf);
                        qr_widen<MODE>(B8 + sn * BN * CB, wo, 1, scA, nxt, pf);
                    }
                }
                it++;
            };
            /* fp8_block: token tk's activation-scale row (nullptr past nr) and the weight
             * block-scale rows of rows cl and ch, KB = Kd / 128 blocks each */
            const int tk = ct & 127, KB = a.Kd / 128;
            const float *sxp = nullptr, *swl = nullptr, *swh = nullptr;
            if constexpr (BLOCK) {
                if (tk < nr) sxp = (const float *)a.A_scales + (int64_t)(G1 ? a.sorted[r0 + tk] / a.K : r0 + tk) * KB;
                const float *wsb = (const float *)a.W_scales + e * (a.N / 128) * KB;
                swl = wsb + (cl / 128) * KB;
                swh = wsb + (ch / 128) * KB;
            }
            if constexpr (PP) {
                /* per 128-column block kb (stages A = 2kb in f, B = 2kb + 1 in f2, both widened
                 * before the turn): store token tk's activation scale of the block into the
                 * warpgroup's slot, wait for this warpgroup's turn (named barrier 4 + wg), issue A's
                 * and B's MMAs into ta from zero, hand the turn to the other warpgroup; then wait
                 * for both (release them), widen the next block's two stages and promote.  The
                 * tensor cores meanwhile run the other warpgroup's block.  The scales are loaded a
                 * block ahead and the slot read by shared loads (Nsight: the promotion's global
                 * scale loads, generic slot loads and barrier after the drain were its longest
                 * stalls, and the two warpgroups drained at once).  Warpgroup 1 gives warpgroup 0
                 * its first turn (before the items) and warpgroup 0 takes the last one after them,
                 * so every arrival is matched.  Same products, promotions and order as the in-step
                 * branch below: the same bits. */
                const uint32_t sxs = moe__fm_smem(Sx + wg * 2 * BM);
                float xn = sxp ? __ldg(sxp) : 0.0f, fln = __ldg(swl), fhn = __ldg(swh);
                /* GEMM2: token tk's pair and routing weight, loaded under the first blocks and
                 * stored in the warpgroup's table after the last (the epilogue reads the table:
                 * its own loads, a pair then its weight, stalled a warpgroup's epilogue for two
                 * round trips) */
                int pq = 0;
                float wq = 1.0f;
                if (!G1 && tk < nr) pq = __ldg(a.sorted + r0 + tk);
                moe__fm_mbar_wait(bar0 + 8 * ((it + 1) % S), ((it + 1) / S) & 1);
                qr_widen<MODE>(B8 + ((it + 1) % S) * BN * CB, wo, 0, scA, f2, pf);
                for (int kb = 0; kb < KB; kb++, bc++) {
                    const float xv = xn, fl = fln, fh = fhn;
                    if (kb + 1 < KB) {
                        xn = sxp ? __ldg(sxp + kb + 1) : 0.0f;
                        fln = __ldg(swl + kb + 1);
                        fhn = __ldg(swh + kb + 1);
                    }
                    const int sa = it % S, sb = (it + 1) % S;
                    const uint64_t da = moe__fm_desc(moe__fm_smem(As + sa * BM * BK));
                    const uint64_t db = moe__fm_desc(moe__fm_smem(As + sb * BM * BK));
                    /* the slot is visible to the warpgroup after the turn's barrier, which its
                     * 128 threads sync on (the slot's previous readers passed the turn before) */
                    const uint32_t slot = sxs + (bc & 1) * BM * 4;
                    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(slot + 4 * tk), "f"(xv) : "memory");
                    asm volatile("bar.sync %0, 256;\n" ::"r"(4 + wg) : "memory"); /* this warpgroup's turn */
                    moe__fm_wg_fence();
                    qr_group<HM>(ta, f[0], da, 0);
                    qr_group<HM>(ta, f[1], da + 4, 1);
                    moe__fm_wg_commit();
                    qr_group<HM>(ta, f2[0], db, 1);
                    qr_group<HM>(ta, f2[1], db + 4, 1);
                    moe__fm_wg_commit();
                    asm volatile("bar.arrive %0, 256;\n" ::"r"(5 - wg) : "memory"); /* the other's turn */
                    moe__fm_wg_wait0(); /* A and B done */
                    __syncwarp();
                    if (lane == 0) {
                        moe__fm_mbar_arrive(bar0 + 8 * (S + sa));
                        moe__fm_mbar_arrive(bar0 + 8 * (S + sb));
                    }
                    /* the next block's stages widened with the promotion in one basic block, so
                     * ptxas may fill the code loads' latency with its multiply-adds; after an
                     * item's last block the two stages read are the next item's, maybe not yet
                     * arrived: those values are never used (its start widens both again) */
                    if (kb + 1 < KB) {
                        moe__fm_mbar_wait(bar0 + 8 * ((it + 2) % S), ((it + 2) / S) & 1);
                        moe__fm_mbar_wait(bar0 + 8 * ((it + 3) % S), ((it + 3) / S) & 1);
                    }
                    qr_widen<MODE>(B8 + ((it + 2) % S) * BN * CB, wo, 0, scA, f, pf);
                    qr_widen<MODE>(B8 + ((it + 3) % S) * BN * CB, wo, 0, scA, f2, pf);
#pragma unroll
                    for (int j = 0; j < 16; j++) {
                        float sx0, sx1;
                        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                                     : "=f"(sx0), "=f"(sx1)
                                     : "r"(slot + 4 * (8 * j + c2)));
                        acc[4 * j] += ta[4 * j] * (sx0 * fl);
                        acc[4 * j + 1] += ta[4 * j + 1] * (sx1 * fl);
                        acc[4 * j + 2] += ta[4 * j + 2] * (sx0 * fh);
                        acc[4 * j + 3] += ta[4 * j + 3] * (sx1 * fh);
                    }
                    if (!G1 && kb == 0 && tk < nr && !a.llama4) wq = __ldg(a.wts + pq);
                    it += 2;
                }
                if constexpr (!G1) {
                    /* the table's previous readers (the last item's epilogue) passed a turn since */
                    const uint32_t tb = moe__fm_smem(Sx + 2 * 2 * BM + wg * 2 * BM);
                    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(tb + 4 * tk), "r"(pq) : "memory");
                    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(tb + 4 * (BM + tk)), "f"(wq) : "memory");
                    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
                }
            } else if constexpr (BLOCK) {
                /* per 128-column block (stages 2kb, 2kb + 1): its MMAs into ta from zero, then
                 * acc += ta x (the token's activation scale x the row's weight block scale), the
                 * exact kernel's promotion.  Thread tk of a warpgroup loads token tk's activation
                 * scale into the warpgroup's Sx slot (slots alternate by block), so the 32 of a
                 * thread's token columns cost no registers while the MMAs run. */
                float *sxs = Sx + wg * 2 * BM;
                for (int kb = 0; kb < KB; kb++, bc++) {
                    const float xv = sxp ? __ldg(sxp + kb) : 0.0f, fl = __ldg(swl + kb), fh = __ldg(swh + kb);
                    step(2 * kb, f, f2, ta, 0);
                    step(2 * kb + 1, f2, f, ta, 1);
                    moe__fm_wg_wait0();
                    float *slot = sxs + (bc & 1) * BM;
                    slot[tk] = xv;
                    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
#pragma unroll
                    for (int j = 0; j < 16; j++) {
                        const float2 sv = *(const float2 *)(slot + 8 * j + c2);
                        acc[4 * j] += ta[4 * j] * (sv.x * fl);
                        acc[4 * j + 1] += ta[4 * j + 1] * (sv.y * fl);
                        acc[4 * j + 2] += ta[4 * j + 2] * (sv.x * fh);
                        acc[4 * j + 3] += ta[4 * j + 3] * (sv.y * fh);
                    }
                }
                __syncwarp();
                if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (S + (it + S - 1) % S));
            } else if constexpr (INT4) {
                for (int kt = 0; kt < gr.KT; kt++, it++) {
                    const int s = it % S;
                    const bool more = kt + 1 < gr.KT;
                    next_scales(kt);
                    const uint64_t db = moe__fm_desc(moe__fm_smem(As + s * BM * BK));
                    const uint8_t *cn = B8 + ((it + 1) % S) * BN * CB; /* the next stage's codes */
                    moe__fm_wg_fence();
                    /* both groups' MMAs in flight; group 0 promoted, then the next stage's group 0
                     * widened while group 1 runs (ptxas spills a few words at the register cap) */
                    qr_group(ta, f[0], db, 0);
                    moe__fm_wg_commit();
                    qr_group(tb, f[1], db + 4, 0);
                    moe__fm_wg_commit();
                    moe__fm_wg_wait1();
                    qr_add_rows(acc, ta, pf[0][0], pf[0][1]);
                    if (more) {
                        moe__fm_mbar_wait(bar0 + 8 * ((it + 1) % S), ((it + 1) / S) & 1);
                        qr_widen<MODE>(cn, wo, 0, scA, f, pf);
                    }
                    moe__fm_wg_wait0();
                    qr_add_rows(acc, tb, pf[1][0], pf[1][1]);
                    __syncwarp();
                    if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (S + s)); /* stage s read */
                    if (more) qr_widen<MODE>(cn, wo, 1, scA, f, pf);
                }
            } else {
                for (int kt = 0; kt < gr.KT; kt += 2) {
                    step(kt, f, f2, acc, 1);
                    step(kt + 1, f2, f, acc, 1);
                }
                moe__fm_wg_wait0();
                __syncwarp();
                if (lane == 0) moe__fm_mbar_arrive(bar0 + 8 * (S + (it + S - 1) % S));
            }
            /* epilogue: accumulator row lo / hi, token column 8j + c2 (+1); GEMM1 needs the pairs
             * only for llama4 */
            if (INT4 || BLOCK) load_pairs();
            if constexpr (I4F) asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
            if constexpr (G1) {
                /* ACT >= 0: the gated activation ACT, known at compile time; -1: a.act, gated or
                 * not.  The activation's switch inside the unrolled loop made GEMM1's epilogue a
                 * third of its instructions, with a jump table and every activation's code between
                 * one element and the next (instruction-cache misses) */
                auto epi1 = [&](auto ak) {
                    constexpr int ACT = decltype(ak)::v;
                    const bool gated = ACT >= 0 || gr.gated;
                    const int pl = !PERM_OUT ? cl : F8 ? qr_pos8(cl) : qr_pos(cl);
                    const int ph = !PERM_OUT ? ch : F8 ? qr_pos8(ch) : qr_pos(ch);
                    uint16_t *orow = a.inter + (int64_t)(r0 + c2) * a.I; /* row 8j + c2 + i: + (8j + i) I */
#pragma unroll
                    for (int j = 0; j < 16; j++, orow += 8 * (int64_t)a.I)
#pragma unroll
                        for (int i = 0; i < 2; i++) {
                            const int r = 8 * j + c2 + i;
                            if (r >= nr) continue;
                            float vl = acc[4 * j + i] * ts, vh = acc[4 * j + 2 + i] * ts;
                            if (I4F) { /* 2^-b, then 2^-a: each exact, no early underflow */
                                vl *= xr[r];
                                vh *= xr[r];
                            }
                            if (a.llama4) {
                                const float c1 = a.wts[a.sorted[r0 + r]];
                                vl *= c1;
                                vh *= c1;
                            }
                            if (bias) {
                                vl += bl;
                                vh += bh;
                            }
                            uint16_t *o = orow + (i ? a.I : 0);
                            if (gated) {
                                const float v = moe__fm_act(ACT >= 0 ? ACT : a.act, vl, vh, a.alpha, a.beta, a.limit);
                                o[pl] = moe__f32_to_bf16(v);
                                if (AMAX) amx = qr_absmax(amx, v);
                            } else {
                                const float fl = moe__fm_act(MOE_ACT_RELU2, vl, 0.0f, 0, 0, 0);
                                const float fh = moe__fm_act(MOE_ACT_RELU2, vh, 0.0f, 0, 0, 0);
                                o[pl] = moe__f32_to_bf16(fl);
                                o[ph] = moe__f32_to_bf16(fh);
                                if (AMAX) amx = qr_absmax(qr_absmax(amx, fl), fh);
                            }
                        }
                };
                if (gr.gated)
                    moe__fm_act_at(a.act, epi1);
                else
                    epi1(moe__fm_actc<-1>{});
            } else {
#pragma unroll
                for (int j = 0; j < 16; j++)
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        const int r = 8 * j + c2 + i;
                        if (r >= nr) continue;
                        float vl = acc[4 * j + i] * ts, vh = acc[4 * j + 2 + i] * ts;
                        if (I4F) {
                            vl *= xr[r];
                            vh *= xr[r];
                        }
                        if (bias) {
                            vl += bl;
                            vh += bh;
                        }
                        float *yrow = a.y + (int64_t)pp[2 * j + i] * a.N;
                        yrow[cl] = vl * wt[2 * j + i];
                        yrow[ch] = vh * wt[2 * j + i];
                    }
            }
        }
        if (PP && wg == 0) asm volatile("bar.sync 4, 256;\n" ::: "memory"); /* warpgroup 1's last hand-over */
        if (AMAX) { /* the bf16 bits as f32 bits; one atomic a warp (every consumer thread ran the same items) */
            const uint32_t m = moe__q_warp_max((uint32_t)(moe__f32_to_bf16(amx) & 0x7FFFu) << 16, 32);
            if (lane == 0 && m != 0) atomicMax(a.inter_amax, m);
        }
    }
#endif
}

/* ------------------------------------------------------- widen codes -- */

/* dst [rows, cols] 16-bit <- activation codes: row i from src row sorted[i] / K (sorted
 * non-null: x's codes into GEMM1's sorted order) or row i; only the rows of the row tiles (nv,
 * from the tile table, as k_permute).  fp8 / fp8_block: e4m3 -> f16; nvfp4 (FP4): e2m1 x its
 * e4m3 scale per 16 (scales [rows, cols / 16]) -> bf16, or f16 in RS order when RS (k_qg_rs
 * multiplies nvfp4 in f16).  All exact. */
template <bool FP4, bool RS>
__global__ void __launch_bounds__(256)
    k_qg_codes16(const uint8_t *__restrict__ src, const uint8_t *__restrict__ scales, const int32_t *sorted, int K,
                 const int32_t *tile_r0, const int32_t *tile_n, const int32_t *ntiles, int cols,
                 uint4 *__restrict__ dst) {
    const int64_t nv = moe__fm_tile_rows(tile_r0, tile_n, ntiles);
    /* units of a row: one 16-byte output word each (RS, and fp8's 8 codes -> 8 f16: consecutive
     * threads write consecutive words; nvfp4 outside RS order: 16 codes, two words) */
    const int c16 = cols / 16, cu = RS || !FP4 ? cols / 8 : c16;
    const int64_t units = nv * cu;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = u / cu;
        const int c = (int)(u - i * cu);
        const int64_t row = sorted ? sorted[i] / K : i;
        if (RS && !FP4) {
            /* fp8 modes, RS8 order: output word m of 64-column stage b holds, at 2t + i, column
             * 16t + 2m + i (the code pairs at bytes 64b + 16t + 2m, t = 0..3) */
            const uint16_t *sp = (const uint16_t *)(src + row * cols + 64 * (c >> 3)) + (c & 7);
            uint32_t o[4];
#pragma unroll
            for (int t = 0; t < 4; t++) {
                const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)__ldg(sp + 8 * t), __NV_E4M3);
                o[t] = (uint32_t)h.x | ((uint32_t)h.y << 16);
            }
            dst[i * (cols / 8) + c] = make_uint4(o[0], o[1], o[2], o[3]);
            continue;
        }
        if (RS) {
            /* output word q (0-3) of 32-column group c / 4: RS-order words 4q .. 4q + 3, i.e. pair
             * j = q (ks = q / 2, h = q % 2) of each of the group's four code words t (columns
             * 8t .. 8t + 7); the four threads of a group read the same 16 code bytes */
            const int gc = c >> 2, q = c & 3;
            const uint4 v = __ldg((const uint4 *)(src + row * (cols / 2)) + gc);
            const uint16_t s16 = __ldg((const uint16_t *)(scales + row * c16) + gc);
            const uint32_t wv[4] = {v.x, v.y, v.z, v.w};
            uint32_t o[4];
#pragma unroll
            for (int t = 0; t < 4; t++) { /* e2m1 x its e4m3 scale as f16 (exact; k_qg_rs's nvfp4 MMAs are f16) */
                const float sc = moe__e4m3_to_f32((uint8_t)(s16 >> (8 * (t >> 1))));
                const float va = moe__e2m1_to_f32((uint8_t)((wv[t] >> (4 * q)) & 0xFu)) * sc;
                const float vb = moe__e2m1_to_f32((uint8_t)((wv[t] >> (4 * q + 16)) & 0xFu)) * sc;
                asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(o[t]) : "f"(vb), "f"(va));
            }
            dst[i * (2 * c16) + c] = make_uint4(o[0], o[1], o[2], o[3]);
            continue;
        }
        if (FP4) {
            const uint2 v = __ldg((const uint2 *)(src + row * (cols / 2)) + c);
            const uint32_t s2 = moe__fq_scale2<MOE_QUANT_NVFP4>(__ldg(scales + row * c16 + c));
            dst[i * (2 * c16) + 2 * c] = moe__fq_w4x8_bf16<true>(v.x, s2);
            dst[i * (2 * c16) + 2 * c + 1] = moe__fq_w4x8_bf16<true>(v.y, s2);
            continue;
        }
        const uint2 v = __ldg((const uint2 *)(src + row * cols) + c); /* codes 8c .. 8c + 7 */
        const uint32_t wv[2] = {v.x, v.y};
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(wv[j] & 0xFFFF), __NV_E4M3);
            const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(wv[j] >> 16), __NV_E4M3);
            o[2 * j] = (uint32_t)lo.x | ((uint32_t)lo.y << 16);
            o[2 * j + 1] = (uint32_t)hi.x | ((uint32_t)hi.y << 16);
        }
        dst[i * (2 * c16) + c] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

/* ------------------------------------------------ mxint4's f16 fold (MOE__FQ_I4F) -- */

/* 2^a for a row whose largest |bf16| has the bits m (0x7FFF mask applied): a puts that magnitude in
 * [2^15, 2^16) (largest bf16 there: 65280 <= 65504, f16's largest), clamped to [-126, 126]; 0 for
 * an all-zero row.  Every value of the row at or above 2^-17 after scaling (2^-33 of the largest)
 * is then exact in f16, and the smaller ones round to f16's subnormal grid: an error at most
 * 2^-25 after scaling, 2^-40 of the row's largest magnitude. */
__device__ __forceinline__ int i4_row_exp(uint32_t m) {
    if (m == 0) return 0;
    const float v = __uint_as_float(m << 16);
    const int E = m >= 0x7F80u ? 127 : ilogbf(v); /* inf / NaN: as the largest binade */
    return min(126, max(-126, 15 - E));
}
__device__ __forceinline__ float i4_pow2(int a) { return __int_as_float((a + 127) << 23); }
/* Two bf16 (a word) times up -> two f16 (a word), round to nearest even. */
__device__ __forceinline__ uint32_t i4_cvt2(uint32_t w, float up) {
    const __half2 h = __floats2half2_rn(__uint_as_float(w << 16) * up, __uint_as_float(w & 0xFFFF0000u) * up);
    return *(const uint32_t *)&h;
}
/* rs[t] = 2^-a of x's row t (bf16 [T, cols]), one warp a row. */
__global__ void __launch_bounds__(256) k_i4_xrows(const uint4 *__restrict__ x, int64_t T, int cols, float *rs) {
    const int lane = threadIdx.x & 31, c8 = cols / 8;
    for (int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < T; t += ((int64_t)gridDim.x * blockDim.x) >> 5) {
        uint32_t m = 0;
        for (int c = lane; c < c8; c += 32) m = max(m, moe__fm_absmax8(__ldg(x + t * c8 + c)));
        m = moe__q_warp_max(m, 32);
        if (lane == 0) rs[t] = i4_pow2(-i4_row_exp(m));
    }
}

/* ov to 16-byte word w of the sorted row of each of token t's local pairs (pos[t K + k]: the
 * align's pair -> sorted row map, -1 for a pair of another rank; rows of c8 words): the x-once
 * kernels' stores. */
__device__ __forceinline__ void qr_scatter(uint4 *__restrict__ xp, const int32_t *__restrict__ pos, int64_t t, int K,
                                           int c8, int w, uint4 ov) {
    const int32_t *pt = pos + t * K;
#pragma unroll 4
    for (int k = 0; k < K; k++) {
        const int r = __ldg(pt + k);
        if (r >= 0) xp[(int64_t)r * c8 + w] = ov;
    }
}

/* RS-order output word q (0-3) of a 32-column group of 16-bit values (sp: the group's four input
 * words): RS-order words 8ks + t + 4h (ks = q / 2, h = q % 2) for t = 0..3, from input words 4t + ks
 * and 4t + ks + 2 (the four threads of a group read the same 64 bytes). */
__device__ __forceinline__ void qr_rs_word(const uint4 *sp, int q, uint32_t (&o)[4]) {
    const int ks = q >> 1, sel = (q & 1) ? 0x7632 : 0x5410;
#pragma unroll
    for (int t = 0; t < 4; t++) {
        const uint4 v = __ldg(sp + t);
        o[t] = __byte_perm(ks ? v.y : v.x, ks ? v.w : v.z, sel);
    }
}

/* x's rows (bf16 [T, cols]) into GEMM1's sorted order: row i of xp from row sorted[i] / K, one
 * 16-byte output word a thread (consecutive threads write consecutive words); only the rows of the
 * row tiles.  RS: in RS order (k_qg_rs), else as they are (k_wreg).  F16 (MOE__FQ_I4F): as f16
 * times 2^a of their token (rs: 2^-a), and rrow[i] = that 2^-a (the epilogues' per-row factor);
 * else the bf16 values (the mx modes on k_qg_rs). */
template <bool RS, bool F16>
__global__ void __launch_bounds__(256) k_qr_permute(const uint4 *__restrict__ x, const int32_t *sorted, int K,
                                                    const int32_t *tile_r0, const int32_t *tile_n,
                                                    const int32_t *ntiles, int cols, const float *rs, float *rrow,
                                                    uint4 *__restrict__ xp) {
    const int64_t nv = moe__fm_tile_rows(tile_r0, tile_n, ntiles);
    const int c8 = cols / 8; /* 16-byte words of a row: one output word a thread */
    const int64_t units = nv * c8;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = u / c8;
        const int c = (int)(u - i * c8);
        const int64_t tok = sorted[i] / K;
        float up = 1.0f;
        if (F16) {
            const float r = __ldg(rs + tok);
            up = 1.0f / r; /* a power of two: exact */
            if (c == 0) rrow[i] = r;
        }
        uint32_t o[4];
        if (RS) {
            qr_rs_word(x + tok * c8 + (c & ~3), c & 3, o);
        } else {
            const uint4 v = __ldg(x + tok * c8 + c);
            o[0] = v.x;
            o[1] = v.y;
            o[2] = v.z;
            o[3] = v.w;
        }
        if (F16)
#pragma unroll
            for (int t = 0; t < 4; t++) o[t] = i4_cvt2(o[t], up);
        xp[i * c8 + c] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

/* k_qr_permute<true, F16> once a token, after the align (mxfp4 / mxint4 on k_qg_rs, as
 * k_qr_nvfp4_x): token t's RS-order word c (F16: as f16 times 1 / rs[t]) made once and written to
 * the sorted row of each of its local pairs (pos[t K + k], -1 for a pair of another rank), with
 * F16's rrow[row] = rs[t]; one thread a 16-byte output word.  k_qr_permute made it once a pair,
 * reading x's row again for each. */
template <bool F16>
__global__ void __launch_bounds__(256) k_qr_xonce(const uint4 *__restrict__ x, int64_t T, int cols, int K,
                                                  const int32_t *__restrict__ pos, const float *rs, float *rrow,
                                                  uint4 *__restrict__ xp) {
    const int c8 = cols / 8;
    const int64_t units = T * c8;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = u / c8;
        const int c = (int)(u - t * c8);
        uint32_t o[4];
        qr_rs_word(x + t * c8 + (c & ~3), c & 3, o);
        float r = 1.0f;
        if (F16) {
            r = __ldg(rs + t);
            const float up = 1.0f / r; /* a power of two: exact */
#pragma unroll
            for (int k = 0; k < 4; k++) o[k] = i4_cvt2(o[k], up);
        }
        qr_scatter(xp, pos, t, K, c8, c, make_uint4(o[0], o[1], o[2], o[3]));
        if (F16 && c == 0)
            for (int k = 0; k < K; k++) {
                const int row = __ldg(pos + t * K + k);
                if (row >= 0) rrow[row] = r;
            }
    }
}

/* The intermediate (bf16 [rows, I], the rows of the row tiles) as f16 times 2^a of its own row, in
 * place (element-wise: the order GEMM1 wrote stays), rs[i] = 2^-a; one warp a row. */
__global__ void __launch_bounds__(256) k_i4_inter(uint16_t *inter, const int32_t *tile_r0, const int32_t *tile_n,
                                                  const int32_t *ntiles, int I, float *rs) {
    const int64_t nv = moe__fm_tile_rows(tile_r0, tile_n, ntiles);
    const int lane = threadIdx.x & 31, c8 = I / 8;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < nv; i += ((int64_t)gridDim.x * blockDim.x) >> 5) {
        uint4 *row = (uint4 *)(inter + i * I);
        uint32_t m = 0;
        for (int c = lane; c < c8; c += 32) m = max(m, moe__fm_absmax8(row[c]));
        m = moe__q_warp_max(m, 32);
        const int ea = i4_row_exp(m);
        if (lane == 0) rs[i] = i4_pow2(-ea);
        const float up = i4_pow2(ea);
        for (int c = lane; c < c8; c += 32) {
            const uint4 v = row[c];
            row[c] = make_uint4(i4_cvt2(v.x, up), i4_cvt2(v.y, up), i4_cvt2(v.z, up), i4_cvt2(v.w, up));
        }
    }
}

/* The range of a bf16 scale tensor for the fold: r[0] = the largest exponent of a nonzero finite
 * scale (floor log2), r[1] = the smallest exponent of its lowest set significant bit, r[2] = 1 if
 * any scale is inf / NaN (r[0], r[1] start at INT_MIN, INT_MAX). */
__global__ void __launch_bounds__(256) k_i4_range(const uint16_t *__restrict__ s, int64_t n, int *r) {
    int top = INT_MIN, low = INT_MAX, bad = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const uint32_t u = s[i] & 0x7FFFu, ef = u >> 7;
        if (u == 0) continue;
        if (ef == 255) {
            bad = 1;
            continue;
        }
        const uint32_t mant = ef ? (u & 0x7Fu) | 0x80u : u & 0x7Fu;
        const int e0 = ef ? (int)ef - 134 : -133; /* value = mant x 2^e0 */
        top = max(top, e0 + 31 - __clz(mant));
        low = min(low, e0 + __ffs(mant) - 1);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        top = max(top, __shfl_xor_sync(0xffffffffu, top, o));
        low = min(low, __shfl_xor_sync(0xffffffffu, low, o));
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    if ((threadIdx.x & 31) == 0) {
        if (top != INT_MIN) atomicMax(r, top);
        if (low != INT_MAX) atomicMin(r + 1, low);
        if (bad) atomicOr(r + 2, 1);
    }
}

/* The largest byte of s[0, n) into *m (atomicMax; *m starts at 0). */
__global__ void __launch_bounds__(256) k_u8_max(const uint8_t *__restrict__ s, int64_t n, int *m) {
    int v = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        v = max(v, (int)s[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0 && v > 0) atomicMax(m, v);
}

/* nvfp4 for k_qg_rs, one 16-byte output word q (0-3) of a 32-column group (v: the group's 16
 * words of bf16 pairs, columns in order): both 16-column blocks' scale codes and, for t = 0..3,
 * columns 8t + q and 8t + q + 4 (the word's RS-order positions, qr_pos) quantised with the
 * quantiser's scale function and division (quant_math.h: the same scales and e2m1 values as
 * moe_quantize under the global scale gs), then e2m1 x the block scale as f16 (exact; the global
 * scale is applied in the GEMM epilogue).  The block scales (qr_nvfp4_scales) are computed once a group: a thread that
 * makes all four words of a group (k_qr_nvfp4_inter) shares them; a thread a word (k_qr_nvfp4_x)
 * computes both for its own. */
struct qr_nvfp4_blocks {
    float d[2];       /* block b's divisor: its scale (the e4m3 code's value) x gs, NaN where that is 0 */
    uint32_t s2[2];   /* its scale as f16x2 (k_qg_rs multiplies nvfp4 in f16: moe__fq_e2m1x8_f16) */
};
__device__ __forceinline__ qr_nvfp4_blocks qr_nvfp4_scales(const uint32_t (&v)[16], float gs) {
    qr_nvfp4_blocks k;
#pragma unroll
    for (int b = 0; b < 2; b++) { /* 16-column block b: words 8b .. 8b + 7 */
        const uint32_t *w = v + 8 * b;
        const uint32_t m = max(moe__fm_absmax8(make_uint4(w[0], w[1], w[2], w[3])),
                               moe__fm_absmax8(make_uint4(w[4], w[5], w[6], w[7])));
        const uint32_t sc = moe__q_nvfp4_scale(moe__q_amax(m << 16), gs);
        const float d = moe__q_mul(moe__e4m3_to_f32((uint8_t)sc), gs);
        k.d[b] = d == 0.0f ? __uint_as_float(MOE__Q_NAN_BITS) : d;
        uint32_t hi;
        moe__fq_e4m3x4_f16(sc * 0x101u, k.s2[b], hi); /* (s, s) as f16x2, exact (any arch) */
    }
    return k;
}
/* The codes of moe__q_nvfp4_code are never made: x / d is rounded straight to its e2m1 value
 * (moe__e2m1_round_f32; a divisor of 0 is NaN here, so those values give +0 as the code 0 does),
 * two values packed as f16x2, then times the block scale (f16x2) by one FMA with -0 (as the
 * widening of codes ends): e2m1 x e4m3 is exact in f16, so the same values as the codes give. */
__device__ __forceinline__ uint4 qr_nvfp4_word(const uint32_t (&v)[16], int q, const qr_nvfp4_blocks &k) {
    uint32_t o[4];
    const int sh = 16 * (q & 1);
#pragma unroll
    for (int t = 0; t < 4; t++) { /* columns 8t + q (word 4t + q / 2) and 8t + q + 4 (word 4t + 2 + q / 2) */
        const uint32_t wa = (q & 2) ? v[4 * t + 1] : v[4 * t], wb = (q & 2) ? v[4 * t + 3] : v[4 * t + 2];
        const float d = k.d[t >> 1];
        const float ma = moe__e2m1_round_f32(moe__q_div(__uint_as_float(((wa >> sh) & 0xFFFFu) << 16), d));
        const float mb = moe__e2m1_round_f32(moe__q_div(__uint_as_float(((wb >> sh) & 0xFFFFu) << 16), d));
        uint32_t m2;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(m2) : "f"(mb), "f"(ma)); /* ma low, mb high: exact */
        asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(o[t]) : "r"(m2), "r"(k.s2[t >> 1]), "r"(0x80008000u));
    }
    return make_uint4(o[0], o[1], o[2], o[3]); /* (element 0, element 4) pairs */
}
/* The 64 bytes at p as 16 words. */
__device__ __forceinline__ void qr_load16(const uint4 *p, uint32_t (&v)[16]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint4 w = p[j];
        v[4 * j] = w.x;
        v[4 * j + 1] = w.y;
        v[4 * j + 2] = w.z;
        v[4 * j + 3] = w.w;
    }
}

/* nvfp4's intermediate for k_qg_rs in one pass, in place: one thread a 32-column group of a row
 * of the row tiles, its four output words made by qr_nvfp4_word, which share the block scales
 * (the global scale from the amax bits GEMM1 took, *amax).  Qwen3-30B-A3B T = 1024, H100: 17.6 us,
 * against 21.7 for this kernel's earlier form and 26.4 for a thread a word (each computing both
 * block scales).  The first thread stores the global scale to *gt for GEMM2. */
__global__ void __launch_bounds__(256) k_qr_nvfp4_inter(uint16_t *inter, const int32_t *tile_r0, const int32_t *tile_n,
                                                        const int32_t *ntiles, int I, const unsigned int *amax,
                                                        float *gt) {
    const int64_t nv = moe__fm_tile_rows(tile_r0, tile_n, ntiles);
    const float gs = moe__q_nvfp4_global(moe__q_amax(*amax));
    if (blockIdx.x == 0 && threadIdx.x == 0) *gt = gs;
    const int64_t units = nv * (I / 32); /* rows are I long: group u of the region is row u / (I / 32) */
    uint4 *p = (uint4 *)inter;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        uint32_t v[16];
        qr_load16(p + 4 * u, v);
        /* the block scales once, then the four words in a loop, each stored as made (v holds
         * the group).  Unrolled, the kernel was 5 250 SASS instructions and compute-bound; as a
         * loop it is a quarter of the code: 84 -> 67 us at Qwen3-30B-A3B T = 4096 (H100, Nsight;
         * a larger unrolled variant stalled on "no instruction" half the time, so the
         * instruction cache is the likely limit) */
        const qr_nvfp4_blocks k = qr_nvfp4_scales(v, gs);
#pragma unroll 1
        for (int q = 0; q < 4; q++) p[4 * u + q] = qr_nvfp4_word(v, q, k);
    }
}

/* nvfp4's x for k_qg_rs in one pass, after the align: x (bf16 [T, cols]) quantised once a token
 * (qr_nvfp4_word) and written, widened in RS order, to the sorted row of each of the token's local pairs (pos[t K + k]: the align's inverse
 * of sorted, -1 for a pair of another rank).  The codes are never stored and no pair repeats its
 * token's quantisation (before: k_amax, k_nvfp4_bf16, k_finalize, then k_qg_codes16<true, true>
 * once a pair).  x's amax is the maximum of the nparts partial maxima the align's other blocks
 * took (parts), reduced by every block.  One thread a 16-byte output word, consecutive threads
 * consecutive words.  Block 0's thread 0 stores the global scale to *gt (GEMM1's epilogue) and
 * zeroes *iamax (GEMM1 takes the intermediate's amax into it; stream order puts both after the
 * previous call's readers). */
__global__ void __launch_bounds__(256) k_qr_nvfp4_x(const uint4 *__restrict__ x, int64_t T, int cols, int K,
                                                    const int32_t *__restrict__ pos, const unsigned int *parts,
                                                    int nparts, float *gt, unsigned int *iamax,
                                                    uint4 *__restrict__ xp) {
    __shared__ uint32_t red[8]; /* launched with 256 threads */
    uint32_t am = 0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) am = max(am, __ldg(parts + i));
    am = moe__q_warp_max(am, 32);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = am;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < 8; w++) am = max(am, red[w]);
    const float gs = moe__q_nvfp4_global(moe__q_amax(am));
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        *gt = gs;
        *iamax = 0;
    }
    const int c8 = cols / 8;
    const int64_t units = T * c8;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = u / c8;
        const int w = (int)(u - t * c8);
        uint32_t v[16];
        qr_load16(x + t * c8 + (w & ~3), v);
        qr_scatter(xp, pos, t, K, c8, w, qr_nvfp4_word(v, w & 3, qr_nvfp4_scales(v, gs)));
    }
}

/* fp8_block's x for k_qg_rs in one pass, after the align: each token's 128-column blocks
 * quantised once with the quantiser's functions (moe__q_fp8_scale of the block's amax,
 * moe__q_fp8_code: the codes and scales of moe_quantize), the codes' f16 values written, in RS8
 * order, to the sorted row of each of the token's local pairs (pos, as k_qr_nvfp4_x), the scales
 * to xs [T, cols / 128] (GEMM1 reads them per token).  Before: k_rows (codes and scales), then
 * k_qg_codes16<false, true> widening the codes once a pair.  One thread a 16-byte output word,
 * the 16 of a block consecutive (the block's amax across a half-warp): output word m of 64-column
 * stage b holds, at 2t + i, column 64b + 16t + 2m + i (element m % 4 of input word 8b + 2t + m / 4);
 * every input word of a block is some thread's, so their maxima cover it. */
__global__ void __launch_bounds__(256) k_qr_fb_x(const uint4 *__restrict__ x, int64_t T, int cols, int K,
                                                 const int32_t *__restrict__ pos, float *__restrict__ xs,
                                                 uint4 *__restrict__ xp) {
    const int c8 = cols / 8, nb = cols / 128;
    const int64_t units = T * c8; /* a multiple of 16, as the grid's stride: half-warps stay whole */
    const unsigned hm = 0xFFFFu << (threadIdx.x & 16);
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = u / c8;
        const int w = (int)(u - t * c8), m = w & 7;
        const uint4 *src = x + t * c8 + (w & ~7) + (m >> 2);
        uint32_t v[4], am = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const uint4 in = __ldg(src + 2 * k);
            am = max(am, moe__fm_absmax8(in));
            const int e = m & 3;
            v[k] = e == 0 ? in.x : e == 1 ? in.y : e == 2 ? in.z : in.w;
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) am = max(am, (uint32_t)__shfl_xor_sync(hm, am, o));
        const float sc = moe__q_fp8_scale(moe__q_amax(am << 16));
        if ((w & 15) == 0) xs[t * nb + (w >> 4)] = sc;
        uint32_t o[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const uint32_t lo = moe__q_fp8_code(__uint_as_float(v[k] << 16), sc);
            const uint32_t hi = moe__q_fp8_code(__uint_as_float(v[k] & 0xFFFF0000u), sc);
            const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(lo | hi << 8), __NV_E4M3);
            o[k] = (uint32_t)h.x | ((uint32_t)h.y << 16);
        }
        qr_scatter(xp, pos, t, K, c8, w, make_uint4(o[0], o[1], o[2], o[3]));
    }
}

/* fp8_block's intermediate for the exact kernel in one pass: every 128-column group of the rows
 * of the row tiles quantised with the quantiser's own code (moe__q_rows: the same codes and
 * scales as moe_quantize), the codes' f16 values written over the bf16 values, the scales to
 * scales [rows, I / 128]. */
__global__ void __launch_bounds__(256) k_qg_block16(uint16_t *inter, const int32_t *tile_r0, const int32_t *tile_n,
                                                    const int32_t *ntiles, int I, float *scales) {
    const int64_t nv = moe__fm_tile_rows(tile_r0, tile_n, ntiles);
    constexpr int GPB = 256 / moe__q_rows_geom<128>::L;
    moe__q_rows<MOE_QUANT_FP8_BLOCK, 128, 256, true>(inter, MOE_BF16, (int64_t)blockIdx.x * GPB, nv * (I / 128),
                                                     (int64_t)gridDim.x * GPB, 0, nullptr, (uint8_t *)inter, scales);
}

/* ---------------------------------------------------------- host glue -- */

typedef void (*qg_kernel)(const moe__fq_gemm_args, const CUtensorMap, const CUtensorMap);

/* kernel variants: 0 k_qg_exact (every mode), 1 k_qg_fp8 (fp8 / fp8_block) */
template <int MODE> qg_kernel qg_exact(bool g1) { return g1 ? k_qg_exact<MODE, true> : k_qg_exact<MODE, false>; }
qg_kernel qg_pick(int v, int mode, bool g1) {
    if (v == 1) return mode == MOE_QUANT_FP8_BLOCK ? (g1 ? k_qg_fp8<MOE_QUANT_FP8_BLOCK, true> : k_qg_fp8<MOE_QUANT_FP8_BLOCK, false>)
                                                   : (g1 ? k_qg_fp8<MOE_QUANT_FP8, true> : k_qg_fp8<MOE_QUANT_FP8, false>);
    switch (mode) {
    case MOE_QUANT_FP8_BLOCK: return qg_exact<MOE_QUANT_FP8_BLOCK>(g1);
    case MOE_QUANT_NVFP4: return qg_exact<MOE_QUANT_NVFP4>(g1);
    case MOE_QUANT_MXFP4: return qg_exact<MOE_QUANT_MXFP4>(g1);
    case MOE_QUANT_MXINT4: return qg_exact<MOE_QUANT_MXINT4>(g1);
    default: return qg_exact<MOE_QUANT_FP8>(g1);
    }
}
size_t qg_smem(int v, int mode) {
    if (v == 1) return Q8_SMEM;
    switch (mode) {
    case MOE_QUANT_FP8_BLOCK: return qx_cfg<MOE_QUANT_FP8_BLOCK>::SMEM;
    case MOE_QUANT_NVFP4: return qx_cfg<MOE_QUANT_NVFP4>::SMEM;
    case MOE_QUANT_MXFP4: return qx_cfg<MOE_QUANT_MXFP4>::SMEM;
    case MOE_QUANT_MXINT4: return qx_cfg<MOE_QUANT_MXINT4>::SMEM;
    default: return qx_cfg<MOE_QUANT_FP8>::SMEM;
    }
}
bool qg_w4(int mode) {
    return mode == MOE_QUANT_NVFP4 || mode == MOE_QUANT_MXFP4 || mode == MOE_QUANT_MXINT4 || mode == MOE__FQ_I4F ||
           mode == MOE__FQ_F4S;
}
template <int MODE, bool PP = false> qg_kernel qr_rs(bool g1) {
    return g1 ? k_qg_rs<MODE, true, PP> : k_qg_rs<MODE, false, PP>;
}
/* pp: fp8_block's ping-pong turns (k_qg_rs's PP) */
qg_kernel qr_pick(int mode, bool g1, bool pp) {
    switch (mode) {
    case MOE_QUANT_FP8: return qr_rs<MOE_QUANT_FP8>(g1);
    case MOE_QUANT_FP8_BLOCK: return pp ? qr_rs<MOE_QUANT_FP8_BLOCK, true>(g1) : qr_rs<MOE_QUANT_FP8_BLOCK>(g1);
    case MOE_QUANT_NVFP4: return qr_rs<MOE_QUANT_NVFP4>(g1);
    case MOE_QUANT_MXFP4: return qr_rs<MOE_QUANT_MXFP4>(g1);
    case MOE__FQ_I4F: return qr_rs<MOE__FQ_I4F>(g1);
    case MOE__FQ_F4S: return qr_rs<MOE__FQ_F4S>(g1);
    default: return qr_rs<MOE_QUANT_MXINT4>(g1);
    }
}

moe_status qg_attrs(void) {
    static int done = 0;
    if (__atomic_load_n(&done, __ATOMIC_ACQUIRE)) return MOE_OK;
    const int modes[7] = {MOE_QUANT_FP8, MOE_QUANT_FP8_BLOCK, MOE_QUANT_NVFP4, MOE_QUANT_MXFP4, MOE_QUANT_MXINT4,
                          MOE__FQ_I4F, MOE__FQ_F4S};
    for (int v = 0; v < 3; v++)
        for (int m = 0; m < (v == 1 ? 2 : v == 2 ? 7 : 5); m++)
            for (int g = 0; g < 2; g++)
                for (int pp = 0; pp < (v == 2 && modes[m] == MOE_QUANT_FP8_BLOCK ? 2 : 1); pp++)
                    MOE_CUDA_TRY(FN, cudaFuncSetAttribute(v == 2 ? qr_pick(modes[m], g, pp) : qg_pick(v, modes[m], g),
                                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                          (int)(v == 2 ? qr_smem(modes[m]) : qg_smem(v, modes[m]))));
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
    return MOE_OK;
}

/* Kernel variant of a mode for hidden size H: 0 k_qg_exact, 1 k_qg_fp8 (fp8 / fp8_block with
 * MOE_FUSED_FP8MMA=1), 2 k_qg_rs.  MOE_FUSED_QRS=0 / =1 choose 0 / 2 for every mode; unset, k_qg_rs
 * runs the 4-bit modes and fp8, and fp8_block from H = 4096 (H100, 2026-11-27, fourteenth
 * session, docs/performance.md: fp8 12-30% faster at the wgmma sizes; fp8_block, whose per-128
 * promotion drains the MMAs every two stages, 3% faster at DeepSeek-V3 (H 7168) T = 4096 and 2-5%
 * at Mixtral (H 4096), 1-5% slower at Qwen3-30B-A3B (H 2048) T = 1024 / 4096). */
int qg_variant(int mode, int64_t H) {
    const char *qrs = getenv("MOE_FUSED_QRS");
    const bool off = qrs && qrs[0] == '0' && qrs[1] == '\0', on = qrs && qrs[0] == '1' && qrs[1] == '\0';
    if (mode == MOE__FQ_I4F || mode == MOE__FQ_F4S) return 2; /* chosen by the caller only where k_qg_rs runs */
    if (qg_w4(mode)) return off ? 0 : 2;
    const char *env = getenv("MOE_FUSED_FP8MMA");
    if (env && env[0] == '1') return 1;
    if (on || off) return on ? 2 : 0;
    return mode == MOE_QUANT_FP8 || H >= 4096 ? 2 : 0;
}

} // namespace

bool moe__fq_qgmma_quantises_inter(int mode, int64_t H) {
    const int v = qg_variant(mode, H);
    return (mode == MOE_QUANT_FP8_BLOCK && v != 1) || (mode == MOE_QUANT_NVFP4 && v == 2);
}
bool moe__fq_qgmma_rs(int mode, int64_t H) { return qg_variant(mode, H) == 2; }

moe_status moe__fq_i4_xrows(cudaStream_t st, int dev, const uint16_t *x, int64_t T, int H, float *rs) {
    k_i4_xrows<<<moe__cuda_grid(dev, T * 32, 256), 256, 0, st>>>((const uint4 *)x, T, H, rs);
    MOE_CUDA_LAUNCHED(FN);
    return MOE_OK;
}

#undef FN
#define FN "moe_experts_new_quant"
/* A small device reduction into n ints on g's stream: a slot allocated and set to init, launch(slot), the
 * result copied into out, the slot freed, the stream synchronised (moe__cuda_i4_range, moe__cuda_u8_max). */
template <typename L>
static moe_status qg_small_reduce(const moe__cuda_guard &g, const int *init, int n, int *out, L &&launch) {
    int *d = nullptr;
    const size_t bytes = sizeof(int) * (size_t)n;
    MOE_CUDA_TRY(FN, cudaMallocAsync((void **)&d, bytes, g.stream));
    cudaError_t e = cudaMemcpyAsync(d, init, bytes, cudaMemcpyHostToDevice, g.stream);
    if (e == cudaSuccess) launch(d);
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpyAsync(out, d, bytes, cudaMemcpyDeviceToHost, g.stream);
    const cudaError_t f = cudaFreeAsync(d, g.stream);
    if (e == cudaSuccess) e = f;
    if (e == cudaSuccess) e = cudaStreamSynchronize(g.stream);
    MOE_CUDA_TRY(FN, e);
    return MOE_OK;
}

extern "C" moe_status moe__cuda_i4_range(const moe_tensor *scales, int *r) {
    moe__cuda_guard g(FN, scales->dev.index);
    MOE_TRY(g.status);
    const int init[3] = {INT_MIN, INT_MAX, 0};
    const int64_t n = moe_tensor_numel(scales);
    return qg_small_reduce(g, init, 3, r, [&](int *d) {
        if (n > 0)
            k_i4_range<<<moe__cuda_grid(g.dev, n, 256), 256, 0, g.stream>>>((const uint16_t *)moe_tensor_data(scales), n, d);
    });
}

extern "C" moe_status moe__cuda_u8_max(const moe_tensor *t, int *m) {
    moe__cuda_guard g(FN, t->dev.index);
    MOE_TRY(g.status);
    *m = 0;
    const int init[1] = {0};
    const int64_t n = moe_tensor_numel(t);
    return qg_small_reduce(g, init, 1, m, [&](int *d) {
        if (n > 0) k_u8_max<<<moe__cuda_grid(g.dev, n, 256), 256, 0, g.stream>>>((const uint8_t *)moe_tensor_data(t), n, d);
    });
}

bool moe__fq_qgmma_use(int mode, int64_t P, int lc, int64_t H, int64_t I) {
    if (mode != MOE_QUANT_FP8 && mode != MOE_QUANT_FP8_BLOCK && !qg_w4(mode)) return false;
    if (lc <= 0 || H % 128 != 0 || I % 128 != 0) return false;
    /* average pairs per local expert from which the kernels run (below: fused_quant.cu's k_wreg;
     * H100, 2026-11-27, docs/performance.md): at 32 k_wreg is faster in every mode (Qwen3-30B-A3B
     * T = 512 fp8_block 351 vs 452 us, nvfp4 386 vs 636, mxfp4 303 vs 554; Mixtral T = 128
     * fp8_block 811 vs 844, nvfp4 741 vs 1154); at 64 these kernels win for fp8_block (Mixtral
     * T = 256 987 vs 1314) and mxint4 (1663 vs 1699), nvfp4 / mxfp4 are even (1199 / 1068 vs 1179 /
     * 1046).  Hence 48 for fp8 / fp8_block, 64 for the 4-bit modes. */
    const long rows = moe__fq_pairs_bound("MOE_FUSED_QWGMMA", mode);
    if (rows == 0 || P < (int64_t)rows * lc) return false;
    bool ok = false;
    if (moe__fm_hopper_ready(&ok) != MOE_OK || !ok) {
        moe_clear_error();
        return false;
    }
    return qg_attrs() == MOE_OK;
}

moe_status moe__fq_a16(cudaStream_t st, int dev, int mode, bool g1, const moe__fq_gemm_args &a, int64_t P, void *xp,
                       const uint4 **out, bool rs) {
    /* A as 16-bit: GEMM1 x's rows permuted into xp (fp8 / nvfp4: their codes widened; mxfp4 /
     * mxint4: x itself), GEMM2 the intermediate's codes widened into the intermediate's region
     * (its bf16 values are quantised already; fp8_block: quantised and widened in one pass;
     * mxfp4 / mxint4 read it as it is) */
    const uint4 *A16 = g1 ? (const uint4 *)xp : (const uint4 *)a.A_bf16;
    const int threads = 256;
    const int64_t pcap = moe__cuda_sm_count(dev) * 16, pb = P < pcap ? P : pcap; /* permute: a row a block */
    if (mode == MOE__FQ_I4F) {
        /* f16 rows times their powers of two: x's (per token in a.A_scales, from k_i4_xrows)
         * permuted (k_qr_permute), RS order for k_qg_rs, a.A_rows per sorted row; the intermediate's in place,
         * a.A_rows written */
        const float *tok = (const float *)a.A_scales; /* per token (k_i4_xrows) */
        if (g1 && rs && a.A_pos) /* once a token, scattered */
            k_qr_xonce<true><<<moe__cuda_grid(dev, a.T * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.T, a.Kd, a.K, a.A_pos, tok, (float *)a.A_rows, (uint4 *)xp);
        else if (g1 && rs)
            k_qr_permute<true, true><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.sorted, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd, tok, (float *)a.A_rows,
                (uint4 *)xp);
        else if (g1)
            k_qr_permute<false, true><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.sorted, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd, tok, (float *)a.A_rows,
                (uint4 *)xp);
        else
            k_i4_inter<<<moe__cuda_grid(dev, P * 32, threads), threads, 0, st>>>(
                (uint16_t *)a.A_bf16, a.tile_r0, a.tile_n, a.ntiles, a.Kd, (float *)a.A_rows);
        MOE_CUDA_LAUNCHED(FN);
    } else if (rs && (mode == MOE_QUANT_FP8 || mode == MOE_QUANT_FP8_BLOCK)) {
        /* k_qg_rs, RS8 order: x's codes widened and permuted; the intermediate as the exact
         * kernel's (GEMM1 wrote its values in RS8 order, which quantising per tensor or per 128
         * columns and widening keep) */
        if (g1 && a.A_pos) { /* fp8_block's x quantised once a token, scattered */
            k_qr_fb_x<<<moe__cuda_grid(dev, a.T * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.T, a.Kd, a.K, a.A_pos, (float *)a.A_scales, (uint4 *)A16);
        } else if (g1) {
            k_qg_codes16<false, true><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
                a.A_codes, nullptr, a.sorted, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd, (uint4 *)A16);
        } else if (mode == MOE_QUANT_FP8_BLOCK) {
            k_qg_block16<<<moe__cuda_grid(dev, P * (a.Kd / 128), 256 / moe__q_rows_geom<128>::L), 256, 0, st>>>(
                (uint16_t *)a.A_bf16, a.tile_r0, a.tile_n, a.ntiles, a.Kd, (float *)a.A_scales);
        } else {
            k_qg_codes16<false, false><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
                a.A_codes, nullptr, nullptr, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd, (uint4 *)A16);
        }
        MOE_CUDA_LAUNCHED(FN);
    } else if (rs) { /* k_qg_rs: RS order (GEMM2 of the mx modes: GEMM1 wrote it so) */
        if (mode == MOE_QUANT_NVFP4 && !g1) { /* quantised and widened in one pass */
            k_qr_nvfp4_inter<<<moe__cuda_grid(dev, P * (a.Kd / 32), threads), threads, 0, st>>>(
                (uint16_t *)a.A_bf16, a.tile_r0, a.tile_n, a.ntiles, a.Kd, a.inter_amax, (float *)a.A_tensor);
            MOE_CUDA_LAUNCHED(FN);
        } else if (mode == MOE_QUANT_NVFP4 && a.A_pos) { /* x quantised once a token, scattered */
            k_qr_nvfp4_x<<<moe__cuda_grid(dev, a.T * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.T, a.Kd, a.K, a.A_pos, a.A_amax, a.A_amax_n, (float *)a.A_tensor, a.inter_amax,
                (uint4 *)xp);
            MOE_CUDA_LAUNCHED(FN);
        } else if (mode == MOE_QUANT_NVFP4) {
            k_qg_codes16<true, true><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
                a.A_codes, (const uint8_t *)a.A_scales, g1 ? a.sorted : nullptr, a.K, a.tile_r0, a.tile_n, a.ntiles,
                a.Kd, (uint4 *)A16);
            MOE_CUDA_LAUNCHED(FN);
        } else if (g1 && a.A_pos) { /* mxfp4 / mxint4: x once a token, scattered */
            k_qr_xonce<false><<<moe__cuda_grid(dev, a.T * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.T, a.Kd, a.K, a.A_pos, nullptr, nullptr, (uint4 *)xp);
            MOE_CUDA_LAUNCHED(FN);
        } else if (g1) {
            k_qr_permute<true, false><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
                (const uint4 *)a.A_bf16, a.sorted, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd, nullptr, nullptr,
                (uint4 *)xp);
            MOE_CUDA_LAUNCHED(FN);
        }
    } else if (mode == MOE_QUANT_MXFP4 || mode == MOE_QUANT_MXINT4) {
        if (g1) {
            moe__k_fm_permute<<<(unsigned)pb, 256, 0, st>>>((const uint4 *)a.A_bf16, a.sorted, a.tile_r0, a.tile_n,
                                                            a.ntiles, a.K, a.Kd / 8, (uint4 *)xp);
            MOE_CUDA_LAUNCHED(FN);
        }
    } else if (mode == MOE_QUANT_NVFP4) {
        k_qg_codes16<true, false><<<moe__cuda_grid(dev, P * (a.Kd / 16), threads), threads, 0, st>>>(
            a.A_codes, (const uint8_t *)a.A_scales, g1 ? a.sorted : nullptr, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd,
            (uint4 *)A16);
        MOE_CUDA_LAUNCHED(FN);
    } else if (!g1 && mode == MOE_QUANT_FP8_BLOCK) {
        /* quantised and widened in one pass (moe__fq_qgmma_quantises_inter) */
        k_qg_block16<<<moe__cuda_grid(dev, P * (a.Kd / 128), 256 / moe__q_rows_geom<128>::L), 256, 0, st>>>(
            (uint16_t *)a.A_bf16, a.tile_r0, a.tile_n, a.ntiles, a.Kd, (float *)a.A_scales);
        MOE_CUDA_LAUNCHED(FN);
    } else {
        k_qg_codes16<false, false><<<moe__cuda_grid(dev, P * (a.Kd / 8), threads), threads, 0, st>>>(
            a.A_codes, nullptr, g1 ? a.sorted : nullptr, a.K, a.tile_r0, a.tile_n, a.ntiles, a.Kd, (uint4 *)A16);
        MOE_CUDA_LAUNCHED(FN);
    }
    *out = A16;
    return MOE_OK;
}

moe_status moe__fq_qgmma(cudaStream_t st, int dev, int mode, bool g1, const moe__fq_gemm_args &a, int64_t P,
                         int64_t max_tiles, void *xp) {
    const bool gated = g1 && a.gated;
    const int v = qg_variant(mode, g1 ? a.Kd : a.N); /* H */
    const int ntn = gated ? a.I / 64 : a.N / QG_BN;
    const int64_t sms = moe__cuda_sm_count(dev), items = max_tiles * ntn;
    const unsigned grid = (unsigned)(items < sms ? items : sms);
    const int64_t pcap = sms * 16, pb = P < pcap ? P : pcap; /* permute: a row a block */
    CUtensorMap tw, ta;
    const char *wn = g1 ? "gate/up codes" : "down codes";
    if (v == 1) {
        MOE_TRY(moe__fm_tmap2(&tw, a.W, (int64_t)a.E * a.N, a.Kd, 1, 128, 64, 128, wn));
        const uint8_t *A = a.A_codes;
        if (g1) {
            moe__k_fm_permute<<<(unsigned)pb, 256, 0, st>>>((const uint4 *)a.A_codes, a.sorted, a.tile_r0, a.tile_n,
                                                            a.ntiles, a.K, a.Kd / 16, (uint4 *)xp);
            MOE_CUDA_LAUNCHED(FN);
            A = (const uint8_t *)xp;
        }
        MOE_TRY(moe__fm_tmap2(&ta, A, P, a.Kd, 1, 128, QG_BM, 128, g1 ? "permuted x codes" : "intermediate codes"));
    } else {
        const bool w4 = qg_w4(mode);
        MOE_TRY(moe__fm_tmap2(&tw, a.W, (int64_t)a.E * a.N, w4 ? a.Kd / 2 : a.Kd, 1, w4 ? QX_BK / 2 : QX_BK, 64,
                              v == 2 && w4 && a.W_swz ? 32 : 0, wn));
        const uint4 *A16 = nullptr;
        MOE_TRY(moe__fq_a16(st, dev, mode, g1, a, P, xp, &A16, v == 2));
        MOE_TRY(moe__fm_tmap2(&ta, A16, P, a.Kd, 2, 64, QG_BM, 128, g1 ? "permuted x (16-bit)" : "intermediate (16-bit)"));
    }
    if (v == 2 && g1 && mode == MOE_QUANT_NVFP4 && !a.A_pos) /* GEMM1 takes the intermediate's amax (zeroed by k_qr_nvfp4_x where it runs) */
        MOE_CUDA_TRY(FN, cudaMemsetAsync(a.inter_amax, 0, sizeof(unsigned int), st));
    if (v == 2)
        qr_pick(mode, g1, mode == MOE_QUANT_FP8_BLOCK && !moe__fq_env_off("MOE_FUSED_FBPP"))<<<grid, 384, qr_smem(mode), st>>>(a, tw, ta);
    else qg_pick(v, mode, g1)<<<grid, 384, qg_smem(v, mode), st>>>(a, tw, ta);
    MOE_CUDA_LAUNCHED(FN);
    return MOE_OK;
}
