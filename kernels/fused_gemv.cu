/* fused_gemv.cu -- decode path of the fused MoE on CUDA (bf16 experts, few tokens).
 *
 * At T <= a few tokens every expert has at most T rows, so tensor-core tiles waste their work
 * and the align / finalize steps (or their folds, ~1.5 us a block) cost more than the math.
 * This path streams the weights as matrix-vector products instead, 2 launches after routing:
 *   1. k_fg_up (GEMM1 + activation): block (unit chunk, pair p).  The pair with the lowest
 *      index among those routed to expert e (the "leader") computes e's gate/up rows for every
 *      pair of e (up to NB x rows at once, more in further passes); other pairs' blocks exit.
 *      One warp = one unit = 2 weight rows: the gate row and the up row of one intermediate
 *      column (packed rows 16g + r and 16g + 8 + r, moe__k_fm_pack), or 2 consecutive rows of
 *      relu2.  Lanes stride over 16-byte chunks along H (ld.global.nc, L1::no_allocate), 4
 *      chunks x 2 rows = 8 independent weight loads in flight a lane, f32 FMA, xor-shuffle
 *      reduction; epilogue as in moe__k_fm_gemm's G1 (llama4: the routing weight scales the
 *      accumulator once; bias b13; moe__fm_act) into inter[p, :] (pair order, bf16).
 *      Block (0, 0) counts routed ids out of [0, E) into the workspace's error counter.
 *   2. k_fg_down (GEMM2 + combine): block (4 output columns, token t), tokens fastest so the
 *      blocks reading the same W2 rows for different tokens run together (L2).  One warp = one
 *      column c: the token's local pairs (in k order) are laid end to end as one vector of
 *      chunks, lanes stride over it 8 chunks at a time (8 weight loads in flight a lane), each
 *      chunk's dot product times its pair's weight (1 for llama4) accumulated in f32 with the
 *      weighted biases; out[t, c] = bf16(sum) -- zeros for a token without local pairs, so no
 *      finalize.  Same value as the tile path (sum over k of w_k (dot_k + b2)), other order.
 * Deterministic (no atomics on values), graph-capturable (nothing allocated, no host sync;
 * grids from T on the host), PDL like the other fused kernels. */
#include "cuda_common.cuh"
#include "fused.h"
#include "fused_moe.cuh"

#include <string.h>

#define FN "moe_fused_moe"

#define MOE_FG_THREADS 128 /* 4 warps a block in both kernels */
#define MOE_FG_DEFAULT_T 4 /* T <= this takes the GEMV path unless MOE_FUSED_GEMV says otherwise */
#define MOE_FG_MAX_T 64    /* largest bound MOE_FUSED_GEMV may set */
#define MOE_FG_U1 4        /* GEMM1: chunk steps a round (x 2 rows = 8 weight loads) */
#define MOE_FG_U2 8        /* GEMM2: chunk steps a round (8 weight loads) */
/* Resident blocks an SM is sized for (<= 128 registers a thread).  Without it ptxas keeps
 * the register count low by interleaving each round's loads with the math that uses them,
 * which leaves 2-3 loads in flight a lane instead of all of the round's. */
#define MOE_FG_MINB 4

struct moe__fg_args : moe__fg_shape {
    const uint16_t *x;    /* hidden bf16 [T, H] */
    const uint16_t *w13;  /* bf16 [E, N1, H], packed (moe__k_fm_pack) */
    const float *b13;     /* f32 [E, N1] (packed row order) or NULL */
    const uint16_t *w2;   /* bf16 [E, H, I] */
    const float *b2;      /* f32 [E, H] or NULL */
    const int32_t *ids;   /* [T, K] */
    const float *wts;     /* [T, K] */
    uint16_t *inter;      /* bf16 [T*K, I] (workspace), pair order */
    uint16_t *out;        /* bf16 [T, H] */
    int32_t *err;         /* routed ids out of range */
};

__device__ __forceinline__ float moe__fg_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float moe__fg_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

/* acc + dot(8 bf16 of w, 8 bf16 of x), in f32, in element order. */
__device__ __forceinline__ float moe__fg_dot8(const uint4 &w, const uint4 &x, float acc) {
    acc = fmaf(moe__fg_lo(w.x), moe__fg_lo(x.x), acc);
    acc = fmaf(moe__fg_hi(w.x), moe__fg_hi(x.x), acc);
    acc = fmaf(moe__fg_lo(w.y), moe__fg_lo(x.y), acc);
    acc = fmaf(moe__fg_hi(w.y), moe__fg_hi(x.y), acc);
    acc = fmaf(moe__fg_lo(w.z), moe__fg_lo(x.z), acc);
    acc = fmaf(moe__fg_hi(w.z), moe__fg_hi(x.z), acc);
    acc = fmaf(moe__fg_lo(w.w), moe__fg_lo(x.w), acc);
    acc = fmaf(moe__fg_hi(w.w), moe__fg_hi(x.w), acc);
    return acc;
}

__device__ __forceinline__ float moe__fg_wsum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ------------------------------------------------------------ GEMM1 + act -- */

/* One pass of one unit: rows rw0, rw1 of expert e against the x rows of pairs q[0 .. n-1]
 * (n <= NB), epilogue into inter. */
template <int NB>
__device__ __forceinline__ void moe__fg_up_pass(const moe__fg_args &a, int64_t e, int u, int rw0, int rw1,
                                                const int (&q)[4], int n) {
    constexpr int U = MOE_FG_U1;
    const int lane = threadIdx.x & 31, nch = a.H >> 3;
    const uint4 *w0 = (const uint4 *)(a.w13 + (e * a.N1 + rw0) * (int64_t)a.H);
    const uint4 *w1 = (const uint4 *)(a.w13 + (e * a.N1 + rw1) * (int64_t)a.H);
    const uint4 *xr[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const int qb = b < n ? q[b] : q[0];
        xr[b] = (const uint4 *)(a.x + (int64_t)(qb / a.K) * a.H);
    }
    float acc0[NB], acc1[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) acc0[b] = acc1[b] = 0.0f;
    for (int c0 = lane; c0 < nch; c0 += 32 * U) {
        /* all loads of the round first, then the math.  No branch around a load (ptxas does
         * not hoist loads out of their own blocks): chunks past the row reload chunk c0 and
         * their weights are zeroed */
        uint4 wa[U], wb[U], xv[U][NB];
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int c = c0 + 32 * j < nch ? c0 + 32 * j : c0;
            wa[j] = moe__fg_ldw(w0 + c);
            wb[j] = moe__fg_ldw(w1 + c);
#pragma unroll
            for (int b = 0; b < NB; b++) xv[j][b] = __ldg(xr[b] + c);
        }
#pragma unroll
        for (int j = 0; j < U; j++) {
            if (c0 + 32 * j >= nch) wa[j] = wb[j] = make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int b = 0; b < NB; b++) {
                acc0[b] = moe__fg_dot8(wa[j], xv[j][b], acc0[b]);
                acc1[b] = moe__fg_dot8(wb[j], xv[j][b], acc1[b]);
            }
        }
    }
#pragma unroll
    for (int b = 0; b < NB; b++) {
        acc0[b] = moe__fg_wsum(acc0[b]);
        acc1[b] = moe__fg_wsum(acc1[b]);
    }
    const float *bias = a.b13 ? a.b13 + e * a.N1 : nullptr;
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b >= n || lane != 0) break;
        const int p = q[b];
        const float sc = a.llama4 ? a.wts[p] : 1.0f;
        float h0 = acc0[b] * sc, h1 = acc1[b] * sc;
        if (bias) {
            h0 += bias[rw0];
            h1 += bias[rw1];
        }
        uint16_t *orow = a.inter + (int64_t)p * a.I;
        if (a.act != MOE_ACT_RELU2) {
            orow[u] = moe__f32_to_bf16(moe__fm_act(a.act, h0, h1, a.alpha, a.beta, a.limit));
        } else {
            const float v0 = moe__fm_act(MOE_ACT_RELU2, h0, 0.0f, 0, 0, 0);
            const float v1 = moe__fm_act(MOE_ACT_RELU2, h1, 0.0f, 0, 0, 0);
            *(uint32_t *)(orow + 2 * u) = (uint32_t)moe__f32_to_bf16(v0) | ((uint32_t)moe__f32_to_bf16(v1) << 16);
        }
    }
}

/* grid (units / 4, T*K); NB x rows a pass (1, 2 or 4: chosen from T on the host). */
template <int NB>
__global__ void __launch_bounds__(MOE_FG_THREADS, MOE_FG_MINB) moe__k_fg_up(const moe__fg_args a) {
    moe__fm_pdl_enter();
    const int warp = threadIdx.x >> 5;
    const int64_t P = a.T * a.K, p = blockIdx.y;
    if (blockIdx.x == 0 && blockIdx.y == 0 && warp == 0) moe__fg_count_bad(a.ids, P, a.E, a.err);
    const int e = a.ids[p];
    if (!moe__fg_local(e, a.E, a.lo, a.lc)) return;
    if (!moe__fg_leader(a.ids, p, e)) return; /* not the leader of e: its block does the work */
    const int u = blockIdx.x * (MOE_FG_THREADS / 32) + warp;
    int rw0, rw1;
    if (a.act != MOE_ACT_RELU2) {
        rw0 = 16 * (u >> 3) + (u & 7); /* gate row of intermediate column u; its up row 8 further */
        rw1 = rw0 + 8;
    } else {
        rw0 = 2 * u; /* columns 2u, 2u + 1 */
        rw1 = rw0 + 1;
    }
    int q[4];
    for (int r0 = 0;; r0 += NB) {
        const int nm = moe__fg_members<4>(a.ids, P, p, e, r0, q);
        const int n = min(NB, nm - r0);
        if (n <= 0) break;
        moe__fg_up_pass<NB>(a, e, u, rw0, rw1, q, n);
        if (r0 + NB >= nm) break;
    }
}

/* --------------------------------------------------------- GEMM2 + combine -- */

/* grid (T * H / 4): block b = column chunk b / T, token b % T; warp w = column 4 * chunk + w. */
__global__ void __launch_bounds__(MOE_FG_THREADS, MOE_FG_MINB) moe__k_fg_down(const moe__fg_args a) {
    constexpr int U = MOE_FG_U2;
    moe__fm_pdl_enter();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t t = blockIdx.x % a.T;
    const int c = (int)(blockIdx.x / a.T) * (MOE_FG_THREADS / 32) + warp;
    const int64_t p0 = t * a.K;
    /* local pairs of the token in k order: lane j < nl takes the j-th */
    int id;
    const unsigned lm = moe__fg_token_local(a, a.ids, p0, id);
    const int nl = __popc(lm);
    unsigned m = lm;
    for (int j = 0; j < lane && m; j++) m &= m - 1;
    const int src = m ? __ffs(m) - 1 : 0;
    const int e = __shfl_sync(0xffffffffu, id, src);
    const int nch = a.I >> 3;
    float wk = 0.0f, acc = 0.0f;
    const uint4 *wrow = (const uint4 *)a.w2; /* row c of the pair's expert */
    uint32_t irow = 0;                       /* the pair's intermediate row, in chunks */
    if (lane < nl) {
        wk = a.llama4 ? 1.0f : a.wts[p0 + src];
        wrow += ((int64_t)e * a.H + c) * nch;
        irow = (uint32_t)((p0 + src) * nch);
        if (a.b2) acc = wk * a.b2[(int64_t)e * a.H + c];
    }
    /* the table in shared memory, not read by shuffles: ptxas keeps loads from moving across
     * a shuffle, which would serialise each round's loads with their uses */
    __shared__ const uint4 *s_wrow[MOE_FG_THREADS / 32][32];
    __shared__ uint32_t s_irow[MOE_FG_THREADS / 32][32];
    __shared__ float s_wk[MOE_FG_THREADS / 32][32];
    s_wrow[warp][lane] = wrow;
    s_irow[warp][lane] = irow;
    s_wk[warp][lane] = wk;
    __syncwarp();
    const uint4 *X = (const uint4 *)a.inter;
    /* chunk f = lane + 32 i of the local pairs laid end to end: pair kl, chunk ch (nch >= 16) */
    int kl = 0, ch = lane;
    if (ch >= nch) {
        ch -= nch;
        kl++;
    }
    /* addresses of a round: computed one round ahead, so that each round starts with all its
     * loads ready to issue (ptxas otherwise interleaves them with the math of the first) */
    const uint4 *wa[U];
    uint32_t xa[U];
    float sw[U];
    unsigned ok = 0; /* bit j: step j of the round is a chunk of a local pair */
    auto addr = [&]() {
        ok = 0;
#pragma unroll
        for (int j = 0; j < U; j++) {
            const bool in = kl < nl; /* else: reload pair 0's chunk 0 (only read while nl > 0) */
            const int s = in ? kl : 0, cc = in ? ch : 0;
            ok |= (unsigned)in << j;
            wa[j] = s_wrow[warp][s] + (unsigned)cc;
            xa[j] = s_irow[warp][s] + (uint32_t)cc;
            sw[j] = s_wk[warp][s];
            ch += 32;
            if (ch >= nch) {
                ch -= nch;
                kl++;
                if (ch >= nch) {
                    ch -= nch;
                    kl++;
                }
            }
        }
    };
    const int total = nl * nch;
    addr();
    for (int f0 = 0; f0 < total; f0 += 32 * U) {
        uint4 wv[U], xv[U];
#pragma unroll
        for (int j = 0; j < U; j++) {
            wv[j] = moe__fg_ldw(wa[j]);
            xv[j] = X[xa[j]]; /* written by k_fg_up: plain (coherent) loads, L1 shared by the block */
        }
#pragma unroll
        for (int j = 0; j < U; j++) { /* a select, not a branch: keeps the loads together */
            const float v = fmaf(sw[j], moe__fg_dot8(wv[j], xv[j], 0.0f), acc);
            acc = ok >> j & 1u ? v : acc;
        }
        addr(); /* the next round's */
    }
    acc = moe__fg_wsum(acc);
    if (lane == 0) a.out[t * a.H + c] = moe__f32_to_bf16(acc);
}

/* ------------------------------------------------------------- host glue -- */

/* Largest T of the GEMV path: MOE_FUSED_GEMV (0 = off, capped at MOE_FG_MAX_T), else 4.
 * 4: each expert then has at most 4 rows (one pass of the NB = 4 kernel), the weights are
 * still read once per distinct expert, and the FMA work per 16-byte weight load (<= 64) stays
 * far below what the SM issues while HBM delivers it; larger T is left to the tile kernels
 * until measured (MOE_FUSED_GEMV=16 etc. lets the bench compare). */
static int64_t moe__fg_bound(void) { return moe__fm_env_bound("MOE_FUSED_GEMV", MOE_FG_DEFAULT_T, MOE_FG_MAX_T); }

bool moe__fm_gemv_eligible(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    if (ex->quant != MOE_QUANT_BF16 || !ex->w13 || !ex->w2 || !A->ws) return false;
    if (A->local_count <= 0 || A->T < 1 || A->T > moe__fg_bound()) return false;
    /* the host checks H, I (multiples of 128) when the experts are made; the kernels need 16 */
    return ex->H % 128 == 0 && ex->I % 128 == 0;
}

moe_status moe__fm_gemv(const moe__cuda_guard &g, const moe__fused_args *A, bool pdl) {
    const struct moe_experts *ex = A->ex;
    struct moe_workspace *ws = A->ws;
    unsigned char *base = (unsigned char *)moe_tensor_data(ws->buf);
    moe__fg_args a;
    memset(&a, 0, sizeof a);
    a.x = (const uint16_t *)moe_tensor_data(A->hidden);
    a.w13 = (const uint16_t *)moe_tensor_data(ex->w13);
    a.b13 = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : nullptr;
    a.w2 = (const uint16_t *)moe_tensor_data(ex->w2);
    a.b2 = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : nullptr;
    a.ids = (const int32_t *)moe_tensor_data(A->ids);
    a.wts = (const float *)moe_tensor_data(A->wts);
    a.inter = (uint16_t *)(base + ws->off_inter);
    a.out = (uint16_t *)moe_tensor_data(A->out);
    a.err = (int32_t *)(base + ws->off_err);
    moe__fg_shape_set(&a, A);
    const int wpb = MOE_FG_THREADS / 32;
    const int64_t units = ex->act != MOE_ACT_RELU2 ? ex->I : ex->I / 2; /* multiples of 64 */
    const dim3 g1((unsigned)(units / wpb), (unsigned)(A->T * A->K));
    const dim3 g2((unsigned)(A->T * (ex->H / wpb)));
    if (A->T == 1) MOE_TRY(moe__fm_go(moe__k_fg_up<1>, g1, MOE_FG_THREADS, 0, g.stream, pdl, a));
    else if (A->T == 2) MOE_TRY(moe__fm_go(moe__k_fg_up<2>, g1, MOE_FG_THREADS, 0, g.stream, pdl, a));
    else MOE_TRY(moe__fm_go(moe__k_fg_up<4>, g1, MOE_FG_THREADS, 0, g.stream, pdl, a));
    MOE_TRY(moe__fm_go(moe__k_fg_down, g2, MOE_FG_THREADS, 0, g.stream, pdl, a));
    return MOE_OK;
}
