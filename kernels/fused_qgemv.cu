/* fused_qgemv.cu -- decode path of the quantised fused MoE on CUDA (fp8, fp8_block; few tokens).
 *
 * At T <= a few tokens the tile path (fused_quant.cu) pays for its launches -- quantisers, align,
 * memsets, two GEMMs, finalize: 6 (fp8_block) to 13 (fp8) after routing -- more than for reading
 * the weights.  This path streams each routed expert's weights once, as matrix-vector products
 * on the tensor cores, in 2 launches after routing:
 *   1. k_qv_up (x quantisation + GEMM1 + activation): grid (N1/16 row tiles, T*K pairs); the
 *      block of the lowest pair routed to expert e (the "leader"; other blocks exit) computes a
 *      16-row tile of W13[e] -- 8 gate rows and their 8 up rows (relu2: 16 rows) -- for every
 *      pair of e, 8 pairs a pass, its 4 warps splitting H in 128-column blocks.  Before that,
 *      x is quantised exactly as moe__cuda_quantize would (fp8: one scale = amax/448 over T x H;
 *      fp8_block: per (token, 128)) into the workspace by the working blocks themselves, in
 *      chunks of 1024 elements shared out without a grid barrier (qv_share); each block first
 *      puts its first round of weight loads in flight, so they overlap that step.  Epilogue as
 *      the tile path's G1 (llama4 weight, bias, moe__fm_act) into inter[p] in pair order (bf16);
 *      fp8 also takes the amax of those values (atomicMax of their bits), the intermediate's
 *      per-tensor amax.  Block (0, 0) counts routed ids out of [0, E).
 *   2. k_qv_down (intermediate quantisation + GEMM2 + combine): grid (H/16 column tiles x T),
 *      tokens fastest (blocks reading the same W2 rows for different tokens run together).  The
 *      intermediate rows of the local pairs are quantised (fp8: with the amax of step 1; fp8_block:
 *      per (pair, 128)) in shared chunks as above, then the block's 8 warps split the token's
 *      (local pair, 128-column block) units of its 16 W2 rows, each unit's f32 partial times
 *      its scales and routing weight; out[t, c] = bf16(sum + sum_k w_k b2[e_k, c]) directly --
 *      zeros for a token without local pairs, so no finalize.
 * The MMA: mma.sync m16n8k16 f16 -> f32, A = 16 weight rows, B = up to 8 activation rows (pairs).
 * e4m3 codes are exact in f16 (cvt.rn.f16x2.e4m3x2, sm_89+; elsewhere bit placement and one
 * exact multiply), so the tensor cores multiply the codes exactly, in f32, and the scales are
 * applied to f32 sums as in the tile path: per 128 columns for fp8_block (activation scale x
 * weight scale), per tensor for fp8 (x or intermediate scale x the expert's weight scale).  Lane
 * (g, q) of a warp loads 16 consecutive codes of rows g and g + 8 (columns 64c + 16q ..) and 16
 * of activation row g, and feeds them to 4 MMAs as the MMA's columns 2q, 2q+1, 2q+8, 2q+9 (any
 * one-to-one map of the columns serves when both operands use it): 16-byte loads straight from
 * global memory, no shared-memory staging.
 * Same numerics as the tile path (quantised activations bit-identical; other f32 summation
 * order); deterministic (no atomics on values); graph-capturable (nothing allocated, no host
 * sync; grids from T on the host).  The work-sharing counters live in the workspace and are
 * zero between calls: step 1 resets step 2's, step 2 resets step 1's. */
#include "cuda_common.cuh"
#include "fused_moe.cuh"
#include "fused_quant.cuh"
#include "quant_rows.cuh"

#include <string.h>

#define FN "moe_fused_moe"

#define QV_UP_THREADS 128 /* GEMM1: 4 warps split H over one 16-row tile */
#define QV_DN_THREADS 256 /* GEMM2: 8 warps split the token's units over one 16-column tile */
#define QV_UP_UG 1        /* GEMM1: 128-column blocks a round (4 weight loads a lane) */
#define QV_DN_UG 4        /* GEMM2: units a round (16 weight loads a lane) */
#define QV_NB 8           /* pairs (MMA columns) a pass */
#define QV_CHUNK 1024     /* elements of one activation-quantisation chunk */
#define QV_DEFAULT_T 4    /* T <= this takes the path unless MOE_FUSED_QGEMV says otherwise */
#define QV_MAX_T 64       /* largest bound MOE_FUSED_QGEMV may set */

namespace {

struct qv_args : moe__fg_shape {
    const uint16_t *x;       /* hidden bf16 [T, H] */
    const uint8_t *w13, *w2; /* e4m3 [E, N1, H], [E, H, I], logical row order */
    const float *s13, *s2;   /* fp8: f32 [E]; fp8_block: f32 [E, N/128, K/128] */
    const float *b13, *b2;   /* f32 [E, N1], [E, H] or NULL */
    const int32_t *ids;      /* [T, K] */
    const float *wts;        /* [T, K] */
    uint8_t *xc;             /* x codes [T, H] */
    float *xs;               /* fp8_block: x scales [T, H/128] */
    float *xt;               /* fp8: x's scale */
    uint16_t *inter;         /* bf16 [T*K, I], pair order */
    uint8_t *gc;             /* the intermediate's codes [T*K, I] */
    float *gs;               /* fp8_block: its scales [T*K, I/128] */
    unsigned *ctr;           /* MOE__FQ_NCTR counters (fused_quant.cuh), zero between calls */
    uint16_t *out;           /* bf16 [T, H] */
    int32_t *err;            /* routed ids out of range */
};

/* ---------------------------------------------------------------- PTX -- */

/* 16 bytes of weights (moe__fg_ldw), as a volatile statement: the first round is issued
 * before the activation quantisation and must not be moved after it. */
__device__ __forceinline__ uint4 qv_ldw(const uint8_t *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned qv_ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned qv_ld_relaxed(const unsigned *p) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* Four e4m3 codes (bytes of w) -> two f16x2 words (bytes 0, 1 -> lo; 2, 3 -> hi), exactly. */
__device__ __forceinline__ void qv_e4m3x4(uint32_t w, uint32_t &lo, uint32_t &hi) {
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

/* d += a * b, m16n8k16, f16 operands, f32 accumulation (fragments as moe__fm_mma). */
__device__ __forceinline__ void qv_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* One 64-column step of a warp: d += W[rows g, g+8] . B[column g] over the quad's 64 columns;
 * lane q holds their 16 codes 16q .. 16q+15 of row g (w0), row g + 8 (w1) and activation
 * row g (b; zero for columns past the pass), the k16 MMA s taking codes 4s .. 4s+3. */
__device__ __forceinline__ void qv_step(float (&d)[4], const uint4 &w0, const uint4 &w1, const uint4 &b) {
    const uint32_t u0[4] = {w0.x, w0.y, w0.z, w0.w}, u1[4] = {w1.x, w1.y, w1.z, w1.w}, ub[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int s = 0; s < 4; s++) {
        uint32_t a0, a1, a2, a3, b0, b1;
        qv_e4m3x4(u0[s], a0, a2);
        qv_e4m3x4(u1[s], a1, a3);
        qv_e4m3x4(ub[s], b0, b1);
        qv_mma(d, a0, a1, a2, a3, b0, b1);
    }
}

/* ------------------------------------------------ shared activation work -- */

/* Chunks 0 .. n-1 of work that the blocks needing its result share, without a grid barrier:
 * a block claims chunks from ctr[0] until none is left, does each one it claimed (work(c), all
 * threads; nothing is waited for before it is finished), counts it in ctr[1] once its writes
 * are fenced (as a cooperative grid sync does: barrier, one thread's fence, the atomic), and
 * returns when all n are counted.  Every claimed chunk belongs to a running block, so the wait
 * ends whatever the residency of the grid.  Blocks that find every chunk claimed skip the
 * atomic (hundreds of blocks would queue on one address).  Block-uniform. */
template <typename F> __device__ __forceinline__ void qv_share(unsigned *ctr, unsigned n, F &&work) {
    __shared__ unsigned s_c;
    for (;;) {
        if (threadIdx.x == 0) s_c = qv_ld_relaxed(ctr) >= n ? n : atomicAdd(ctr, 1u);
        __syncthreads();
        const unsigned c = s_c;
        __syncthreads();
        if (c >= n) break;
        work(c);
        __syncthreads(); /* the block's writes, then one fence (cumulative) and the count */
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(ctr + 1, 1u);
        }
    }
    if (threadIdx.x == 0) {
        while (qv_ld_acquire(ctr + 1) < n) __nanosleep(64);
        __threadfence();
    }
    __syncthreads();
}

/* Maximum absolute-value bits (moe__q_absbits) of the n bf16 values at x (n a multiple of 8,
 * x 16-byte aligned), for every thread of the block. */
template <int NT> __device__ uint32_t qv_amax_bf16(const uint16_t *x, int64_t n) {
    __shared__ uint32_t s_red[NT / 32];
    uint32_t v = 0;
    for (int64_t i = threadIdx.x; i < n / 8; i += NT) {
        const uint4 u = ((const uint4 *)x)[i];
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t lo = moe__q_absbits(moe__bf16_to_f32((uint16_t)w[j]));
            const uint32_t hi = moe__q_absbits(moe__bf16_to_f32((uint16_t)(w[j] >> 16)));
            v = max(v, max(lo, hi));
        }
    }
    v = moe__q_warp_max(v, 32);
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; w++) v = max(v, s_red[w]);
    __syncthreads();
    return v;
}

/* Elements [i0, i1) of the bf16 source as e4m3 codes with the per-tensor scale s (the codes of
 * k_fp8_tensor: moe__q_fp8_code), 8 a thread; i0 and i1 multiples of 8. */
template <int NT>
__device__ __forceinline__ void qv_fp8_codes(const uint16_t *src, int64_t i0, int64_t i1, float s, uint8_t *dst) {
    for (int64_t i = i0 + 8 * (int64_t)threadIdx.x; i < i1; i += 8 * NT) {
        const uint4 u = *(const uint4 *)(src + i);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
        uint32_t c[2] = {0, 0};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t lo = moe__q_fp8_code(moe__bf16_to_f32((uint16_t)w[j]), s);
            const uint32_t hi = moe__q_fp8_code(moe__bf16_to_f32((uint16_t)(w[j] >> 16)), s);
            c[j >> 1] |= (lo | hi << 8) << (16 * (j & 1));
        }
        *(uint2 *)(dst + i) = make_uint2(c[0], c[1]);
    }
}

/* ------------------------------------------------------------ GEMM1 + act -- */

/* grid (N1 / 16, T*K); block (tile u, pair p). */
template <int MODE>
__global__ void __launch_bounds__(QV_UP_THREADS, 8) k_qv_up(const qv_args a) {
    constexpr int UG = QV_UP_UG, NW = QV_UP_THREADS / 32;
    moe__fm_pdl_enter();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
    const int64_t P = a.T * a.K, p = blockIdx.y;
    if (blockIdx.x == 0 && blockIdx.y == 0 && warp == 0) moe__fg_count_bad(a.ids, P, a.E, a.err);
    const int e = a.ids[p];
    if (!moe__fg_local(e, a.E, a.lo, a.lc)) return;
    if (!moe__fg_leader(a.ids, p, e)) return; /* not the leader of e: its block does the work */
    const bool gated = a.act != MOE_ACT_RELU2;
    const int u = blockIdx.x, H = a.H, nkb = H >> 7;
    /* A rows g and g + 8: gate and up rows of intermediate column 8u + g (relu2: rows 16u + g, +8) */
    const int ra = gated ? 8 * u + g : 16 * u + g, rb = gated ? a.I + 8 * u + g : 16 * u + 8 + g;
    const uint8_t *wa = a.w13 + ((int64_t)e * a.N1 + ra) * H + 16 * q;
    const uint8_t *wb = a.w13 + ((int64_t)e * a.N1 + rb) * H + 16 * q;

    /* the first round's weights, in flight during the x quantisation */
    uint4 w0[UG][2], w1[UG][2];
    auto load_w = [&](int kb0) {
#pragma unroll
        for (int j = 0; j < UG; j++) {
            const int kb = kb0 + NW * j < nkb ? kb0 + NW * j : kb0; /* past the row: reload, unused */
#pragma unroll
            for (int h = 0; h < 2; h++) {
                w0[j][h] = qv_ldw(wa + 128 * kb + 64 * h);
                w1[j][h] = qv_ldw(wb + 128 * kb + 64 * h);
            }
        }
    };
    if (warp < nkb) load_w(warp);

    /* x: codes (and fp8_block scales) into the workspace, shared out in chunks */
    const int64_t nx = a.T * H;
    uint32_t xamax = 0;
    bool have_amax = false;
    qv_share(a.ctr, (unsigned)((nx + QV_CHUNK - 1) / QV_CHUNK), [&](unsigned c) {
        const int64_t i0 = (int64_t)c * QV_CHUNK, i1 = min(nx, i0 + QV_CHUNK);
        if (MODE == MOE_QUANT_FP8) {
            if (!have_amax) xamax = qv_amax_bf16<QV_UP_THREADS>(a.x, nx);
            have_amax = true;
            const float s = moe__q_fp8_scale(moe__q_amax(xamax));
            qv_fp8_codes<QV_UP_THREADS>(a.x, i0, i1, s, a.xc);
            if (c == 0 && tid == 0) a.xt[0] = s;
        } else {
            moe__q_rows<MOE_QUANT_FP8_BLOCK, 128, QV_UP_THREADS>(a.x, MOE_BF16, i0 / 128, i1 / 128,
                                                                 QV_UP_THREADS / moe__q_rows_geom<128>::L, 1, nullptr,
                                                                 a.xc, a.xs);
        }
        /* step 2's counters and the intermediate amax, before any block passes this step */
        if (c == 0 && tid < 3) a.ctr[2 + tid] = 0;
    });
    const float ts = MODE == MOE_QUANT_FP8 ? __ldcg(a.xt) * a.s13[e] : 1.0f;
    const int64_t srow = ((int64_t)e * (a.N1 >> 7) + (ra >> 7)) * nkb; /* fp8_block: scale rows of ra, rb */
    const int64_t srow_b = ((int64_t)e * (a.N1 >> 7) + (rb >> 7)) * nkb;

    __shared__ float s_red[NW][32][4];
    int mem[QV_NB];
    for (int r0 = 0;; r0 += QV_NB) {
        const int nm = moe__fg_members<QV_NB>(a.ids, P, p, e, r0, mem);
        const int n = min(QV_NB, nm - r0);
        int pg = -1, pc0 = -1, pc1 = -1; /* pairs of B column g and of accumulator columns 2q, 2q+1 */
#pragma unroll
        for (int j = 0; j < QV_NB; j++) {
            if (j == g) pg = mem[j];
            if (j == 2 * q) pc0 = mem[j];
            if (j == 2 * q + 1) pc1 = mem[j];
        }
        const uint8_t *xr = a.xc + (int64_t)(pg >= 0 ? pg / a.K : 0) * H + 16 * q;
        const int64_t tc0 = pc0 >= 0 ? pc0 / a.K : 0, tc1 = pc1 >= 0 ? pc1 / a.K : 0;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int kb0 = warp; kb0 < nkb; kb0 += NW * UG) {
            if (r0 != 0 || kb0 != warp) load_w(kb0);
            uint4 xv[UG][2];
            float sa[UG], sb[UG], sx0[UG], sx1[UG];
#pragma unroll
            for (int j = 0; j < UG; j++) {
                const int kb = kb0 + NW * j < nkb ? kb0 + NW * j : kb0;
#pragma unroll
                for (int h = 0; h < 2; h++)
                    xv[j][h] = pg >= 0 ? __ldcg((const uint4 *)(xr + 128 * kb + 64 * h)) : make_uint4(0, 0, 0, 0);
                if (MODE == MOE_QUANT_FP8_BLOCK) {
                    sa[j] = a.s13[srow + kb];
                    sb[j] = a.s13[srow_b + kb];
                    sx0[j] = __ldcg(a.xs + tc0 * nkb + kb);
                    sx1[j] = __ldcg(a.xs + tc1 * nkb + kb);
                }
            }
#pragma unroll
            for (int j = 0; j < UG; j++) {
                if (kb0 + NW * j >= nkb) break;
                if (MODE == MOE_QUANT_FP8_BLOCK) {
                    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    qv_step(part, w0[j][0], w1[j][0], xv[j][0]);
                    qv_step(part, w0[j][1], w1[j][1], xv[j][1]);
                    /* as the tile path: partial x (activation scale x weight scale) */
                    acc[0] += part[0] * (sx0[j] * sa[j]);
                    acc[1] += part[1] * (sx1[j] * sa[j]);
                    acc[2] += part[2] * (sx0[j] * sb[j]);
                    acc[3] += part[3] * (sx1[j] * sb[j]);
                } else {
                    qv_step(acc, w0[j][0], w1[j][0], xv[j][0]);
                    qv_step(acc, w0[j][1], w1[j][1], xv[j][1]);
                }
            }
        }
        /* the warps' sums in warp order, then the epilogue on warp 0's registers */
#pragma unroll
        for (int i = 0; i < 4; i++) s_red[warp][lane][i] = acc[i];
        __syncthreads();
        if (warp == 0) {
            uint32_t amax = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = s_red[0][lane][i];
#pragma unroll
                for (int w = 1; w < NW; w++) v += s_red[w][lane][i];
                acc[i] = v;
            }
            const float *bias = a.b13 ? a.b13 + (int64_t)e * a.N1 : nullptr;
#pragma unroll
            for (int cc = 0; cc < 2; cc++) {
                const int pc = cc ? pc1 : pc0;
                if (2 * q + cc >= n || pc < 0) continue;
                float h0 = acc[cc] * ts, h1 = acc[2 + cc] * ts;
                if (a.llama4) {
                    const float c1 = a.wts[pc];
                    h0 *= c1;
                    h1 *= c1;
                }
                if (bias) {
                    h0 += bias[ra];
                    h1 += bias[rb];
                }
                uint16_t *orow = a.inter + (int64_t)pc * a.I;
                uint16_t v0, v1 = 0;
                if (gated) {
                    v0 = moe__f32_to_bf16(moe__fm_act(a.act, h0, h1, a.alpha, a.beta, a.limit));
                    orow[ra] = v0;
                } else {
                    v0 = moe__f32_to_bf16(moe__fm_act(MOE_ACT_RELU2, h0, 0.0f, 0, 0, 0));
                    v1 = moe__f32_to_bf16(moe__fm_act(MOE_ACT_RELU2, h1, 0.0f, 0, 0, 0));
                    orow[ra] = v0;
                    orow[rb] = v1;
                }
                if (MODE == MOE_QUANT_FP8) /* the intermediate's amax: the bf16 values' bits */
                    amax = max(amax, max(moe__q_absbits(moe__bf16_to_f32(v0)), moe__q_absbits(moe__bf16_to_f32(v1))));
            }
            if (MODE == MOE_QUANT_FP8) {
                amax = moe__q_warp_max(amax, 32);
                if (lane == 0 && amax != 0) atomicMax(a.ctr + 4, amax);
            }
        }
        __syncthreads(); /* s_red is reused by the next pass */
        if (r0 + QV_NB >= nm) break;
    }
}

/* --------------------------------------------------------- GEMM2 + combine -- */

/* grid (H / 16 * T): block b = column tile b / T, token b % T. */
template <int MODE>
__global__ void __launch_bounds__(QV_DN_THREADS, 2) k_qv_down(const qv_args a) {
    constexpr int UG = QV_DN_UG, NW = QV_DN_THREADS / 32;
    moe__fm_pdl_enter();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
    const int64_t t = blockIdx.x % a.T, P = a.T * a.K, p0 = t * a.K;
    const int c0 = (int)(blockIdx.x / a.T) * 16, I = a.I, nkb = I >> 7;
    /* the token's local pairs in k order */
    __shared__ int s_e[32], s_p[32], s_nl;
    __shared__ float s_w[32];
    if (warp == 0) {
        int id;
        const unsigned m = moe__fg_token_local(a, a.ids, p0, id);
        if (m >> lane & 1u) {
            const int kl = __popc(m & ((1u << lane) - 1u));
            s_e[kl] = id;
            s_p[kl] = (int)(p0 + lane);
            s_w[kl] = a.llama4 ? 1.0f : a.wts[p0 + lane];
        }
        if (lane == 0) s_nl = __popc(m);
    }
    __syncthreads();
    const int nl = s_nl;
    if (nl == 0) {
        if (tid < 16) a.out[t * a.H + c0 + tid] = 0;
        return;
    }
    /* unit u = (local pair u / nkb, 128-column block u % nkb); warp w takes w, w + NW, ... */
    const int nu = nl * nkb;
    uint4 w0[UG][2], w1[UG][2];
    auto load_w = [&](int u0) {
#pragma unroll
        for (int j = 0; j < UG; j++) {
            const int uu = u0 + NW * j < nu ? u0 + NW * j : u0; /* past the end: reload, unused */
            const int kl = uu / nkb, kb = uu - kl * nkb;
            const uint8_t *wr = a.w2 + ((int64_t)s_e[kl] * a.H + c0 + g) * I + 128 * kb + 16 * q;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                w0[j][h] = qv_ldw(wr + 64 * h);
                w1[j][h] = qv_ldw(wr + 8 * (int64_t)I + 64 * h);
            }
        }
    };
    if (warp < nu) load_w(warp);

    /* the intermediate rows of the local pairs: codes (and fp8_block scales), shared out in
     * chunks (pair, 1024 columns); rows of other pairs are skipped */
    const int cpr = (I + QV_CHUNK - 1) / QV_CHUNK;
    const uint32_t gamax = MODE == MOE_QUANT_FP8 ? __ldcg(a.ctr + 4) : 0u; /* complete: step 1 ended */
    const float sg = moe__q_fp8_scale(moe__q_amax(gamax));
    qv_share(a.ctr + 2, (unsigned)(P * cpr), [&](unsigned c) {
        const int64_t pp = c / cpr, i0 = pp * I + (int64_t)(c % cpr) * QV_CHUNK, i1 = min(pp * I + I, i0 + QV_CHUNK);
        if (moe__fg_local(a.ids[pp], a.E, a.lo, a.lc)) {
            if (MODE == MOE_QUANT_FP8)
                qv_fp8_codes<QV_DN_THREADS>(a.inter, i0, i1, sg, a.gc);
            else
                moe__q_rows<MOE_QUANT_FP8_BLOCK, 128, QV_DN_THREADS>(a.inter, MOE_BF16, i0 / 128, i1 / 128,
                                                                     QV_DN_THREADS / moe__q_rows_geom<128>::L, 1,
                                                                     nullptr, a.gc, a.gs);
        }
        if (c == 0 && tid < 2) a.ctr[tid] = 0; /* step 1's counters (it has ended) */
    });

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int u0 = warp; u0 < nu; u0 += NW * UG) {
        if (u0 != warp) load_w(u0);
        uint4 xv[UG][2];
        float f[UG];
#pragma unroll
        for (int j = 0; j < UG; j++) {
            const int uu = u0 + NW * j < nu ? u0 + NW * j : u0;
            const int kl = uu / nkb, kb = uu - kl * nkb, pp = s_p[kl], e = s_e[kl];
            const uint8_t *xr = a.gc + (int64_t)pp * I + 128 * kb + 16 * q;
#pragma unroll
            for (int h = 0; h < 2; h++)
                xv[j][h] = g == 0 ? __ldcg((const uint4 *)(xr + 64 * h)) : make_uint4(0, 0, 0, 0);
            /* the unit's factor: its scales (as the tile path: activation x weight) and weight */
            if (MODE == MOE_QUANT_FP8_BLOCK)
                f[j] = __ldcg(a.gs + (int64_t)pp * nkb + kb) * a.s2[((int64_t)e * (a.H >> 7) + (c0 >> 7)) * nkb + kb];
            else
                f[j] = sg * a.s2[e];
            f[j] *= s_w[kl];
        }
#pragma unroll
        for (int j = 0; j < UG; j++) {
            if (u0 + NW * j >= nu) break;
            float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            qv_step(part, w0[j][0], w1[j][0], xv[j][0]);
            qv_step(part, w0[j][1], w1[j][1], xv[j][1]);
            acc[0] += part[0] * f[j]; /* column 0 (lanes q = 0): rows g and g + 8 */
            acc[2] += part[2] * f[j];
        }
    }
    /* the warps' sums in warp order, the weighted biases in k order, one rounding */
    __shared__ float s_red[NW][16];
    if (q == 0) {
        s_red[warp][g] = acc[0];
        s_red[warp][g + 8] = acc[2];
    }
    __syncthreads();
    if (tid < 16) {
        float v = s_red[0][tid];
#pragma unroll
        for (int w = 1; w < NW; w++) v += s_red[w][tid];
        if (a.b2)
            for (int kl = 0; kl < nl; kl++) v += s_w[kl] * a.b2[(int64_t)s_e[kl] * a.H + c0 + tid];
        a.out[t * a.H + c0 + tid] = moe__f32_to_bf16(v);
    }
}

template <int MODE> moe_status qv_launch(cudaStream_t st, const qv_args &a) {
    k_qv_up<MODE><<<dim3((unsigned)(a.N1 / 16), (unsigned)(a.T * a.K)), QV_UP_THREADS, 0, st>>>(a);
    MOE_CUDA_LAUNCHED(FN);
    k_qv_down<MODE><<<(unsigned)(a.T * (a.H / 16)), QV_DN_THREADS, 0, st>>>(a);
    MOE_CUDA_LAUNCHED(FN);
    return MOE_OK;
}

} // namespace

/* ------------------------------------------------------------- host glue -- */

/* Largest T of the path: MOE_FUSED_QGEMV (0 = off, capped at QV_MAX_T), else 4.  Each pass
 * of 8 pairs reads the expert's weights again from L2, not HBM; the bound is where the tile
 * kernels are measured to take over. */
bool moe__fq_gemv_eligible(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    if (ex->quant != MOE_QUANT_FP8 && ex->quant != MOE_QUANT_FP8_BLOCK) return false;
    if (!A->ws || A->local_count <= 0 || A->T < 1) return false;
    if (A->T > moe__fm_env_bound("MOE_FUSED_QGEMV", QV_DEFAULT_T, QV_MAX_T)) return false;
    if (ex->H % 128 != 0 || ex->I % 128 != 0) return false; /* checked when the experts are made */
    /* 16-byte loads of x and the codes (views and qtensors made from parts may be offset) */
    const uintptr_t x = (uintptr_t)moe_tensor_data(A->hidden);
    const uintptr_t w13 = (uintptr_t)moe_tensor_data(moe_qtensor_data(ex->q13));
    const uintptr_t w2 = (uintptr_t)moe_tensor_data(moe_qtensor_data(ex->q2));
    return ((x | w13 | w2) & 15) == 0;
}

moe_status moe__fq_gemv(const moe__cuda_guard &g, const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    const struct moe_workspace *ws = A->ws;
    const moe__fq_layout L = moe__fq_layout_of(ws);
    unsigned char *base = (unsigned char *)moe_tensor_data(ws->buf);
    qv_args a;
    memset(&a, 0, sizeof a);
    a.x = (const uint16_t *)moe_tensor_data(A->hidden);
    a.w13 = (const uint8_t *)moe_tensor_data(moe_qtensor_data(ex->q13));
    a.w2 = (const uint8_t *)moe_tensor_data(moe_qtensor_data(ex->q2));
    a.s13 = (const float *)moe_tensor_data(moe_qtensor_scales(ex->q13));
    a.s2 = (const float *)moe_tensor_data(moe_qtensor_scales(ex->q2));
    a.b13 = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : nullptr;
    a.b2 = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : nullptr;
    a.ids = (const int32_t *)moe_tensor_data(A->ids);
    a.wts = (const float *)moe_tensor_data(A->wts);
    a.xc = base + L.xc;
    a.xs = (float *)(base + L.xs);
    a.xt = (float *)(base + L.misc + 16);
    a.inter = (uint16_t *)(base + ws->off_inter);
    a.gc = base + L.gc;
    a.gs = (float *)(base + L.gs);
    a.ctr = (unsigned *)(base + L.misc + MOE__FQ_CTR_OFF);
    a.out = (uint16_t *)moe_tensor_data(A->out);
    a.err = (int32_t *)(base + ws->off_err);
    moe__fg_shape_set(&a, A);
    if (ex->quant == MOE_QUANT_FP8) return qv_launch<MOE_QUANT_FP8>(g.stream, a);
    return qv_launch<MOE_QUANT_FP8_BLOCK>(g.stream, a);
}
