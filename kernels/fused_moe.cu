/* fused_moe.cu -- fused MoE on CUDA (backend slots `fused_pack` and `fused`).
 *
 * One call = routing (moe_route, launched by the core) + 4 launches on the moelab stream:
 *   1. k_align (one block): count the local (token, k) pairs per expert, prefix sums, the
 *      row-tile table of the grouped GEMMs, scatter pair ids into expert-sorted order; routed
 *      ids out of [0, E) are skipped and counted in the workspace's error counter;
 *   2. k_gemm<G1>: grouped GEMM over experts, A rows gathered from x by the permutation,
 *      gate/up (interleaved by 8 when packed) combined in the epilogue by the activation,
 *      bf16 intermediate written in sorted order (llama4: the routing weight scales the
 *      accumulator, i.e. the input, once);
 *   3. k_gemm<G2>: intermediate . W2^T (+ b2), times the routing weight (1 for llama4),
 *      written in f32 per pair (no atomics: deterministic);
 *   4. k_finalize: out[t] = bf16(sum over local k, in order, of y[t, k]).
 * Decode folds (few pairs, GEMM1 grid within one wave): 1 runs in every GEMM1 block's
 * prologue and 4 in GEMM2 (last arriver per token and column tile), so 2 launches remain.
 * Grid sizes come from T on the host (upper bounds; surplus blocks exit), so nothing waits
 * for the device and nothing is allocated: the whole call is graph-capturable.
 *
 * GEMM tiles (mma.sync m16n8k16 bf16, f32 accumulators, cp.async multi-stage pipeline,
 * 128-byte swizzled shared rows, BK = 64):
 *   small: 32 x 64, 4 warps (1 x 4), 6 stages -- decode / few rows per expert: many CTAs
 *          split along N so every weight byte is read once with 16-byte loads;
 *   large: 128 x 128, 8 warps (2 x 4), 3 stages -- prefill without sm_90a;
 *   large on sm_90a: 128 x 256 wgmma, warp-specialised with bulk tensor copies of both
 *          operands, GEMM1's A rows first put in sorted order by k_permute (moe__k_fm_gemm_ws;
 *          MOE_FUSED_TMA_A=0: A gathered by cp.async; MOE_FUSED_WGMMA=1: the cp.async wgmma kernel).
 * Chosen per call from the average rows per local expert. */
#include "cuda_common.cuh"
#include "fused.h"
#include "fused_moe.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>

#include <stdlib.h>

#define FN "moe_fused_moe"

/* ------------------------------------------------------------------ pack -- */

/* dst bf16 [E, N, Kd] <- src (f32 or bf16) [E, N, Kd]; gated: packed row 16g + r is source
 * row 8g + r (r < 8, gate) or half + 8g + r - 8 (up). */
__global__ void moe__k_fm_pack(const void *src, int src_bf16, uint16_t *dst, int64_t E, int64_t N, int64_t Kd,
                               int gated, int64_t half) {
    const int64_t total = E * N * Kd;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t k = i % Kd, en = i / Kd, n = en % N, e = en / N;
        int64_t sn = n;
        if (gated) {
            int64_t g = n >> 4, r = n & 15;
            sn = r < 8 ? g * 8 + r : half + g * 8 + (r - 8);
        }
        int64_t s = (e * N + sn) * Kd + k;
        float v = src_bf16 ? moe__bf16_to_f32(((const uint16_t *)src)[s]) : ((const float *)src)[s];
        dst[i] = moe__f32_to_bf16(v);
    }
}

/* dst f32 [E, N] <- src (f32 or bf16), with the same row permutation. */
__global__ void moe__k_fm_pack_bias(const void *src, int src_bf16, float *dst, int64_t E, int64_t N, int gated,
                                    int64_t half) {
    const int64_t total = E * N;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t n = i % N, e = i / N, sn = n;
        if (gated) {
            int64_t g = n >> 4, r = n & 15;
            sn = r < 8 ? g * 8 + r : half + g * 8 + (r - 8);
        }
        int64_t s = e * N + sn;
        dst[i] = src_bf16 ? moe__bf16_to_f32(((const uint16_t *)src)[s]) : ((const float *)src)[s];
    }
}

/* ----------------------------------------------------------------- align -- */

__global__ void __launch_bounds__(MOE_FM_ALIGN_THREADS)
    moe__k_fm_align(const int32_t *ids, int64_t P, int E, int lo, int lc, int BM, int32_t *sorted,
                    int32_t *tile_e, int32_t *tile_r0, int32_t *tile_n, int32_t *ntiles, int32_t *err,
                    int32_t *pos, const uint4 *amx_x, int64_t amx_n8, unsigned int *amx_part) {
    extern __shared__ int moe__fm_sm[];
    __shared__ int wrow[32], wtile[32];
    moe__fm_pdl_enter();
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    if (blockIdx.x > 0) {
        /* blocks 1..: the largest |bf16| of amx_x's 8-value words (their share), as f32 bits, into
         * amx_part[blockIdx.x - 1] (a maximum of bit patterns: exact in any order) */
        uint32_t m = 0;
        for (int64_t i = (int64_t)(blockIdx.x - 1) * nt + tid; i < amx_n8; i += (int64_t)(gridDim.x - 1) * nt)
            m = max(m, moe__fm_absmax8(__ldg(amx_x + i)));
        for (int o = 16; o > 0; o >>= 1) m = max(m, (uint32_t)__shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) wrow[warp] = (int)m;
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < nt / 32; w++) m = max(m, (uint32_t)wrow[w]);
            amx_part[blockIdx.x - 1] = m << 16;
        }
        return;
    }
    int *cnt = moe__fm_sm, *cur = moe__fm_sm + lc;
    for (int e = tid; e < lc; e += nt) cnt[e] = 0;
    __syncthreads();
    int bad = 0;
    for (int64_t p = tid; p < P; p += nt) {
        int id = ids[p];
        if (id < 0 || id >= E) {
            bad++;
            continue;
        }
        int le = id - lo;
        if (le >= 0 && le < lc) atomicAdd(&cnt[le], 1);
    }
    if (bad) atomicAdd(err, bad);
    __syncthreads();
    /* block-wide exclusive scan of (rows, tiles) over contiguous expert chunks */
    const int per = (lc + nt - 1) / nt;
    const int e0 = min(tid * per, lc), e1 = min(e0 + per, lc);
    int rs = 0, ts = 0;
    for (int e = e0; e < e1; e++) {
        rs += cnt[e];
        ts += (cnt[e] + BM - 1) / BM;
    }
    int ri = rs, ti = ts; /* warp inclusive scan */
    for (int o = 1; o < 32; o <<= 1) {
        int a = __shfl_up_sync(0xffffffffu, ri, o), b = __shfl_up_sync(0xffffffffu, ti, o);
        if (lane >= o) {
            ri += a;
            ti += b;
        }
    }
    if (lane == 31) {
        wrow[warp] = ri;
        wtile[warp] = ti;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = nt >> 5;
        int a = lane < nw ? wrow[lane] : 0, b = lane < nw ? wtile[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int x = __shfl_up_sync(0xffffffffu, a, o), y = __shfl_up_sync(0xffffffffu, b, o);
            if (lane >= o) {
                a += x;
                b += y;
            }
        }
        if (lane < nw) {
            wrow[lane] = a;
            wtile[lane] = b;
        }
    }
    __syncthreads();
    int roff = ri - rs + (warp ? wrow[warp - 1] : 0);
    int toff = ti - ts + (warp ? wtile[warp - 1] : 0);
    if (tid == nt - 1) *ntiles = toff + ts;
    for (int e = e0; e < e1; e++) {
        const int c = cnt[e];
        cur[e] = roff;
        for (int j = 0; j * BM < c; j++) {
            tile_e[toff] = e;
            tile_r0[toff] = roff + j * BM;
            tile_n[toff] = min(BM, c - j * BM);
            toff++;
        }
        roff += c;
    }
    __syncthreads();
    for (int64_t p = tid; p < P; p += nt) {
        const int id = ids[p], le = id - lo;
        int r = -1;
        if (id >= 0 && id < E && le >= 0 && le < lc) {
            r = atomicAdd(&cur[le], 1);
            sorted[r] = (int32_t)p;
        }
        if (pos) pos[p] = r;
    }
}

/* --------------------------------------------------------------- permute -- */

/* Warp-specialised path with the A operand by bulk tensor copy (MOE_FUSED_TMA_A, default):
 * xp[i, :] = hidden[sorted[i] / K, :] (H8 16-byte chunks a row, one block a row at a time,
 * grid-stride), so GEMM1's A rows are contiguous in sorted order like GEMM2's.  Only the nv
 * rows k_align filled are copied: nv = the last row tile's first row + its rows (tiles and rows
 * are laid out in the same expert order; 0 without tiles).  sorted[nv .. P) holds stale ids
 * of earlier calls (k_align writes only local, in-range pairs; they may be >= this call's P),
 * so those rows are skipped: xp keeps whatever the region held there, which GEMM1 reads only
 * as rows >= nr of a row tile, whose outputs are never written (a wgmma output row depends on
 * its own A row only). */
__global__ void __launch_bounds__(256)
    moe__k_fm_permute(const uint4 *__restrict__ hidden, const int32_t *sorted, const int32_t *tile_r0,
                      const int32_t *tile_n, const int32_t *ntiles, int K, int H8, uint4 *__restrict__ xp) {
    moe__fm_pdl_enter();
    const int64_t nv = moe__fm_tile_rows(tile_r0, tile_n, ntiles);
    const int nb = blockDim.x;
    for (int64_t i = blockIdx.x; i < nv; i += gridDim.x) {
        const uint4 *src = hidden + (int64_t)(sorted[i] / K) * H8;
        uint4 *dst = xp + i * H8;
        for (int c0 = threadIdx.x; c0 < H8; c0 += 4 * nb) { /* 4 loads in flight, then 4 stores */
            uint4 v[4];
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (c0 + j * nb < H8) v[j] = __ldg(src + c0 + j * nb);
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (c0 + j * nb < H8) dst[c0 + j * nb] = v[j];
        }
    }
}

/* ------------------------------------------------------------------ GEMM -- */

/* Block -> (row tile, column tile) of a grouped GEMM launched as a 1-D grid of
 * max_tiles x ntn blocks (the row-tile count is only known on the device).  Row tiles go in
 * groups of 8 with the row tile varying fastest inside a group, so the blocks running at
 * once share a few A row tiles and a few weight column tiles in L2 instead of streaming
 * every row tile once per column tile.  false: surplus block. */
__device__ __forceinline__ bool moe__fm_map(int ntiles, int ntn, int &tile, int &nb) {
    const int GM = 8;
    const int64_t b = blockIdx.x;
    if (b >= (int64_t)ntiles * ntn) return false;
    const int group = (int)(b / ((int64_t)GM * ntn));
    const int in = (int)(b - (int64_t)group * GM * ntn);
    const int gs = min(GM, ntiles - group * GM);
    tile = group * GM + in % gs;
    nb = in / gs;
    return true;
}

struct moe__fm_gemm_args {
    const __nv_bfloat16 *A; /* G1: hidden [T, Kd]; G2: intermediate [P, Kd] (sorted order) */
    const __nv_bfloat16 *W; /* [E, N, Kd] */
    const float *bias;      /* [E, N] or NULL */
    const int32_t *sorted, *tile_e, *tile_r0, *tile_n, *ntiles;
    const float *wts;       /* [P] */
    int N, Kd, K, lo, act, llama4, I;
    float alpha, beta, limit;
    __nv_bfloat16 *inter;   /* G1 output [P, I] */
    float *y;               /* G2 output [P, N] */
    /* fold (small tiles, few pairs): G1 does k_align's work in each block's prologue and
     * writes the tables below for G2; G2 does k_finalize's work (last arriver per token and
     * column tile, counters cnt [T, N/BN] zero between calls) */
    int fold, E, lc;
    int cs;                 /* warp-specialised kernel: CTAs per cluster (1 or 2) */
    int64_t P, T;
    const int32_t *ids;     /* [P] routing used */
    int32_t *sorted_w, *tile_e_w, *tile_r0_w, *tile_n_w, *ntiles_w, *err, *cnt;
    uint16_t *out;          /* bf16 [T, N] (G2) */
};

/* moe__fm_act (the activation): fused_moe.cuh, shared with fused_gemv.cu. */

/* k_align inside a small-tile G1 block (a.fold): count the local pairs per expert, scan rows
 * and row tiles, find this block's tile, and gather its pairs in ascending pair order (the
 * order within an expert does not change any value).  The block with column tile 0 of each
 * row tile writes its table entry and sorted ids for G2; block 0 writes the tile count and
 * counts out-of-range ids.  Costs each block a pass over the P ids (P <= MOE_FM_FOLD_MAXP).
 * false: surplus block. */
#define MOE_FM_FOLD_MAXE 512
#define MOE_FM_FOLD_MAXP 1024

template <int NT, int BM>
__device__ __forceinline__ bool moe__fm_fold_align(const moe__fm_gemm_args &a, int ntn, int &tile, int &nb, int &le,
                                                int &r0, int &nr, int *rowsrc, int *rowpair) {
    constexpr int NW = NT / 32;
    __shared__ int cnt[MOE_FM_FOLD_MAXE];
    __shared__ int wr[NW], wt[NW], wc[NW], info[4];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, lc = a.lc;
    for (int e = tid; e < lc; e += NT) cnt[e] = 0;
    __syncthreads();
    int bad = 0;
    for (int64_t p = tid; p < a.P; p += NT) {
        const int id = a.ids[p];
        if (id < 0 || id >= a.E) {
            bad++;
            continue;
        }
        const int l = id - a.lo;
        if (l >= 0 && l < lc) atomicAdd(&cnt[l], 1);
    }
    if (bad && blockIdx.x == 0) atomicAdd(a.err, bad);
    __syncthreads();
    const int per = (lc + NT - 1) / NT;
    const int e0 = min(tid * per, lc), e1 = min(e0 + per, lc);
    int rs = 0, ts = 0;
    for (int e = e0; e < e1; e++) {
        rs += cnt[e];
        ts += (cnt[e] + BM - 1) / BM;
    }
    int ri = rs, ti = ts;
    for (int o = 1; o < 32; o <<= 1) {
        const int x = __shfl_up_sync(0xffffffffu, ri, o), y = __shfl_up_sync(0xffffffffu, ti, o);
        if (lane >= o) {
            ri += x;
            ti += y;
        }
    }
    if (lane == 31) {
        wr[warp] = ri;
        wt[warp] = ti;
    }
    __syncthreads();
    int roff = ri - rs, toff = ti - ts, ttot = 0;
    for (int w = 0; w < NW; w++) {
        if (w < warp) {
            roff += wr[w];
            toff += wt[w];
        }
        ttot += wt[w];
    }
    if (blockIdx.x == 0 && tid == 0) *a.ntiles_w = ttot;
    if (!moe__fm_map(ttot, ntn, tile, nb)) return false; /* ttot is the same in every thread */
    for (int e = e0; e < e1; e++) {
        const int c = cnt[e], te = (c + BM - 1) / BM;
        if (tile >= toff && tile < toff + te) {
            const int j = tile - toff;
            info[0] = e;
            info[1] = roff + j * BM;
            info[2] = min(BM, c - j * BM);
            info[3] = j * BM;
        }
        toff += te;
        roff += c;
    }
    for (int r = tid; r < BM; r += NT) {
        rowsrc[r] = -1;
        rowpair[r] = -1;
    }
    __syncthreads();
    le = info[0];
    r0 = info[1];
    nr = info[2];
    const int k0 = info[3], want = a.lo + le;
    const bool tab = nb == 0;
    if (tab && tid == 0) {
        a.tile_e_w[tile] = le;
        a.tile_r0_w[tile] = r0;
        a.tile_n_w[tile] = nr;
    }
    int run = 0; /* pairs of this expert before the current chunk (the same in every thread) */
    for (int64_t base = 0; base < a.P && run < k0 + nr; base += NT) {
        const int64_t p = base + tid;
        const bool m = p < a.P && a.ids[p] == want;
        const unsigned bal = __ballot_sync(0xffffffffu, m);
        if (lane == 0) wc[warp] = __popc(bal);
        __syncthreads();
        int wb = run, tot = 0;
        for (int w = 0; w < NW; w++) {
            if (w < warp) wb += wc[w];
            tot += wc[w];
        }
        if (m) {
            const int rank = wb + __popc(bal & ((1u << lane) - 1u));
            if (rank >= k0 && rank < k0 + nr) {
                rowpair[rank - k0] = (int)p;
                rowsrc[rank - k0] = (int)(p / a.K);
                if (tab) a.sorted_w[r0 + rank - k0] = (int32_t)p;
            }
        }
        run += tot;
        __syncthreads();
    }
    return true;
}

/* k_finalize inside a small-tile G2 block (a.fold), after its y rows are written: per row,
 * one arrival on the counter of (token, column tile); the block bringing it to the token's
 * number of local pairs sums the token's y rows over k in order (bit-identical to
 * k_finalize) for its BN columns, writes them as bf16 and zeroes the counter. */
template <int NT, int BM, int BN>
__device__ __forceinline__ void moe__fm_fold_finalize(const moe__fm_gemm_args &a, int nb, int nr, const int *rowpair) {
    __shared__ int last[BM];
    const int tid = threadIdx.x;
    const int ntn = a.N / BN, n0 = nb * BN;
    __threadfence();
    __syncthreads();
    for (int r = tid; r < BM; r += NT) {
        int flag = -1;
        if (r < nr) {
            const int64_t t = rowpair[r] / a.K;
            int kl = 0;
            for (int k = 0; k < a.K; k++) {
                const int id = a.ids[t * a.K + k];
                kl += id >= 0 && id < a.E && id - a.lo >= 0 && id - a.lo < a.lc;
            }
            int *c = a.cnt + t * ntn + nb;
            if (atomicAdd(c, 1) == kl - 1) {
                atomicExch(c, 0);
                flag = (int)t;
            }
        }
        last[r] = flag;
    }
    __syncthreads();
    __threadfence();
    constexpr int C4 = BN / 4;
    for (int u = tid; u < BM * C4; u += NT) {
        const int r = u / C4, c = (u - r * C4) * 4;
        const int64_t t = last[r];
        if (t < 0) continue;
        float acc[4] = {0, 0, 0, 0};
        for (int k = 0; k < a.K; k++) {
            const int id = a.ids[t * a.K + k];
            if (id < 0 || id >= a.E || id - a.lo < 0 || id - a.lo >= a.lc) continue;
            const float4 v = __ldcg((const float4 *)(a.y + (t * a.K + k) * (int64_t)a.N + n0 + c));
            acc[0] += v.x;
            acc[1] += v.y;
            acc[2] += v.z;
            acc[3] += v.w;
        }
        uint2 o;
        o.x = (uint32_t)moe__f32_to_bf16(acc[0]) | ((uint32_t)moe__f32_to_bf16(acc[1]) << 16);
        o.y = (uint32_t)moe__f32_to_bf16(acc[2]) | ((uint32_t)moe__f32_to_bf16(acc[3]) << 16);
        *(uint2 *)(a.out + t * a.N + n0 + c) = o;
    }
}

/* Block 0 of a folded G2: tokens with no local pair get zeros (k_finalize writes them). */
template <int NT>
__device__ __forceinline__ void moe__fm_fold_zero(const moe__fm_gemm_args &a) {
    for (int64_t t = threadIdx.x; t < a.T; t += NT) {
        int kl = 0;
        for (int k = 0; k < a.K; k++) {
            const int id = a.ids[t * a.K + k];
            kl += id >= 0 && id < a.E && id - a.lo >= 0 && id - a.lo < a.lc;
        }
        if (kl) continue;
        for (int c = 0; c < a.N; c += 8) *(uint4 *)(a.out + t * a.N + c) = make_uint4(0, 0, 0, 0);
    }
}

template <int BM, int BN, int WM, int WN, int STAGES>
struct moe__fm_cfg {
    static constexpr int BK = 64;
    static constexpr int THREADS = WM * WN * 32;
    static constexpr int SMEM = STAGES * (BM + BN) * BK * 2;
};

template <int BM, int BN, int WM, int WN, int STAGES, int MINB, bool G1>
__global__ void __launch_bounds__(WM *WN * 32, MINB) moe__k_fm_gemm(const moe__fm_gemm_args a) {
    constexpr int BK = 64, NT = WM * WN * 32;
    constexpr int WTM = BM / WM, WTN = BN / WN, MI = WTM / 16, NI = WTN / 8;
    static_assert(NI % 2 == 0, "warp N tile must be a multiple of 16");
    extern __shared__ __align__(128) unsigned char moe__fm_smem_raw[];
    __nv_bfloat16 *As = (__nv_bfloat16 *)moe__fm_smem_raw;
    __nv_bfloat16 *Bs = As + STAGES * BM * BK;
    __shared__ int rowsrc[BM], rowpair[BM];

    moe__fm_pdl_enter();
    constexpr bool FOLDABLE = BM == 32; /* the small configuration only */
    int tile, nb, le, r0, nr;
    if (FOLDABLE && !G1 && a.fold && blockIdx.x == 0) moe__fm_fold_zero<NT>(a);
    if (FOLDABLE && G1 && a.fold) {
        if (!moe__fm_fold_align<NT, BM>(a, a.N / BN, tile, nb, le, r0, nr, rowsrc, rowpair)) return;
    } else {
        if (!moe__fm_map(*a.ntiles, (a.N + BN - 1) / BN, tile, nb)) return;
        const int tid = threadIdx.x;
        le = a.tile_e[tile];
        r0 = a.tile_r0[tile];
        nr = a.tile_n[tile];
        for (int r = tid; r < BM; r += NT) {
            if (r < nr) {
                int p = a.sorted[r0 + r];
                rowpair[r] = p;
                rowsrc[r] = G1 ? p / a.K : r0 + r;
            } else {
                rowpair[r] = -1;
                rowsrc[r] = -1;
            }
        }
        __syncthreads();
    }
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const int64_t e = (int64_t)a.lo + le;
    const int n0 = nb * BN;
    const __nv_bfloat16 *Wb = a.W + (e * a.N + n0) * (int64_t)a.Kd;
    const int KT = a.Kd / BK;

    auto load = [&](int stage, int kt) {
        const int k0 = kt * BK;
        __nv_bfloat16 *as = As + stage * BM * BK, *bs = Bs + stage * BN * BK;
#pragma unroll
        for (int c = tid; c < BM * 8; c += NT) {
            const int r = c >> 3, ch = c & 7, src = rowsrc[r];
            const __nv_bfloat16 *g = src >= 0 ? a.A + (int64_t)src * a.Kd + k0 + ch * 8 : a.A;
            moe__fm_cp16(moe__fm_smem(as + moe__fm_swz(r, ch)), g, src >= 0 ? 16 : 0);
        }
#pragma unroll
        for (int c = tid; c < BN * 8; c += NT) {
            const int r = c >> 3, ch = c & 7;
            moe__fm_cp16(moe__fm_smem(bs + moe__fm_swz(r, ch)), Wb + (int64_t)r * a.Kd + k0 + ch * 8, 16);
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load(s, s);
        moe__fm_commit();
    }
    for (int kt = 0; kt < KT; kt++) {
        moe__fm_wait<STAGES - 2>();
        __syncthreads();
        const int nk = kt + STAGES - 1;
        if (nk < KT) load(nk % STAGES, nk);
        moe__fm_commit();
        const __nv_bfloat16 *as = As + (kt % STAGES) * BM * BK, *bs = Bs + (kt % STAGES) * BN * BK;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
            uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const int row = wm * WTM + mi * 16 + (lane & 15), ch = ks * 2 + (lane >> 4);
                moe__fm_ldsm4(af[mi], moe__fm_smem(as + moe__fm_swz(row, ch)));
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; nj++) {
                const int q = lane >> 3;
                const int row = wn * WTN + nj * 16 + (q >> 1) * 8 + (lane & 7), ch = ks * 2 + (q & 1);
                uint32_t r[4];
                moe__fm_ldsm4(r, moe__fm_smem(bs + moe__fm_swz(row, ch)));
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int ni = 0; ni < NI; ni++) moe__fm_mma(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        }
    }
    moe__fm_wait<0>();

    /* epilogue */
    const int c2 = (lane & 3) * 2;
    const float *bias = a.bias ? a.bias + e * a.N : nullptr;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int r = wm * WTM + mi * 16 + (lane >> 2) + hf * 8;
            if (r >= nr) continue;
            const int p = rowpair[r];
            if (G1) {
                const float sc = a.llama4 ? a.wts[p] : 1.0f;
                __nv_bfloat16 *orow = a.inter + (int64_t)(r0 + r) * a.I;
                if (a.act != MOE_ACT_RELU2) {
                    moe__fm_act_at(a.act, [&](auto ak) {
                        constexpr int ACT = decltype(ak)::v;
#pragma unroll
                        for (int nj = 0; nj < NI / 2; nj++) {
                            const int nn = n0 + wn * WTN + nj * 16;
                            *(uint32_t *)(orow + (nn >> 4) * 8 + c2) = moe__fm_gated_pack<ACT>(
                                a, bias, nn, c2, acc[mi][2 * nj][hf * 2] * sc, acc[mi][2 * nj][hf * 2 + 1] * sc,
                                acc[mi][2 * nj + 1][hf * 2] * sc, acc[mi][2 * nj + 1][hf * 2 + 1] * sc);
                        }
                    });
                } else {
#pragma unroll
                    for (int ni = 0; ni < NI; ni++) {
                        const int nn = n0 + wn * WTN + ni * 8 + c2;
                        float h0 = acc[mi][ni][hf * 2] * sc, h1 = acc[mi][ni][hf * 2 + 1] * sc;
                        if (bias) {
                            h0 += bias[nn];
                            h1 += bias[nn + 1];
                        }
                        const float v0 = moe__fm_act(MOE_ACT_RELU2, h0, 0.0f, 0, 0, 0);
                        const float v1 = moe__fm_act(MOE_ACT_RELU2, h1, 0.0f, 0, 0, 0);
                        const uint32_t pk = (uint32_t)moe__f32_to_bf16(v0) | ((uint32_t)moe__f32_to_bf16(v1) << 16);
                        *(uint32_t *)(orow + nn) = pk;
                    }
                }
            } else {
                const float w = a.llama4 ? 1.0f : a.wts[p];
                float *yrow = a.y + (int64_t)p * a.N;
#pragma unroll
                for (int ni = 0; ni < NI; ni++) {
                    const int nn = n0 + wn * WTN + ni * 8 + c2;
                    float h0 = acc[mi][ni][hf * 2], h1 = acc[mi][ni][hf * 2 + 1];
                    if (bias) {
                        h0 += bias[nn];
                        h1 += bias[nn + 1];
                    }
                    *(float2 *)(yrow + nn) = make_float2(h0 * w, h1 * w);
                }
            }
        }
    if (FOLDABLE && !G1 && a.fold) moe__fm_fold_finalize<NT, BM, BN>(a, nb, nr, rowpair);
}

/* Epilogue of the wgmma kernels: acc[4j + q] of warp w4 in warpgroup wg is tile row
 * wg*64 + w4*16 + lane/4 (+8 for q >= 2), column 8j + 2*(lane%4) (+1 for odd q); rp[r] is the
 * pair id of tile row r < nr (shared or global memory). */
template <bool G1>
__device__ __forceinline__ void moe__fm_wg_epi(const moe__fm_gemm_args &a, const float (&acc)[128], int wg, int w4,
                                               int lane, int64_t e, int r0, int nr, int n0, int nvalid,
                                               const int *rp) {
    const int c2 = (lane & 3) * 2;
    const float *bias = a.bias ? a.bias + e * a.N : nullptr;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = wg * 64 + w4 * 16 + (lane >> 2) + hf * 8;
        if (r >= nr) continue;
        const int p = rp[r];
        if (G1) {
            const float sc = a.llama4 ? a.wts[p] : 1.0f;
            __nv_bfloat16 *orow = a.inter + (int64_t)(r0 + r) * a.I;
            if (a.act != MOE_ACT_RELU2) {
                moe__fm_act_at(a.act, [&](auto ak) {
                    constexpr int ACT = decltype(ak)::v;
#pragma unroll
                    for (int nj = 0; nj < 16; nj++) {
                        const int nn = n0 + nj * 16;
                        if (nj * 16 >= nvalid) continue;
                        *(uint32_t *)(orow + (nn >> 4) * 8 + c2) = moe__fm_gated_pack<ACT>(
                            a, bias, nn, c2, acc[8 * nj + hf * 2] * sc, acc[8 * nj + hf * 2 + 1] * sc,
                            acc[8 * nj + 4 + hf * 2] * sc, acc[8 * nj + 4 + hf * 2 + 1] * sc);
                    }
                });
            } else {
#pragma unroll
                for (int j = 0; j < 32; j++) {
                    if (j * 8 >= nvalid) continue;
                    const int nn = n0 + j * 8 + c2;
                    float h0 = acc[4 * j + hf * 2] * sc, h1 = acc[4 * j + hf * 2 + 1] * sc;
                    if (bias) {
                        h0 += bias[nn];
                        h1 += bias[nn + 1];
                    }
                    const float v0 = moe__fm_act(MOE_ACT_RELU2, h0, 0.0f, 0, 0, 0);
                    const float v1 = moe__fm_act(MOE_ACT_RELU2, h1, 0.0f, 0, 0, 0);
                    *(uint32_t *)(orow + nn) = (uint32_t)moe__f32_to_bf16(v0) | ((uint32_t)moe__f32_to_bf16(v1) << 16);
                }
            }
        } else {
            const float w = a.llama4 ? 1.0f : a.wts[p];
            float *yrow = a.y + (int64_t)p * a.N;
#pragma unroll
            for (int j = 0; j < 32; j++) {
                if (j * 8 >= nvalid) continue;
                const int nn = n0 + j * 8 + c2;
                float h0 = acc[4 * j + hf * 2], h1 = acc[4 * j + hf * 2 + 1];
                if (bias) {
                    h0 += bias[nn];
                    h1 += bias[nn + 1];
                }
                *(float2 *)(yrow + nn) = make_float2(h0 * w, h1 * w);
            }
        }
    }
}

/* Hopper path for the large configuration: 128 x 256 tiles, 2 warpgroups (64 rows each), BK
 * 64, 4 cp.async stages (A rows are gathered through the permutation, which the bulk tensor
 * copy engine cannot do), wgmma.m64n256k16 straight from the swizzled shared tiles.  N need
 * not be a multiple of 256: rows of W past N are zero-filled and their columns not written. */
#define MOE_FM_WG_BM 128
#define MOE_FM_WG_BN 256
#define MOE_FM_WG_STAGES 4
#define MOE_FM_WG_SMEM (MOE_FM_WG_STAGES * (MOE_FM_WG_BM + MOE_FM_WG_BN) * 64 * 2 + 1024)

template <bool G1>
__global__ void __launch_bounds__(256, 1) moe__k_fm_gemm_wg(const moe__fm_gemm_args a) {
    constexpr int BM = MOE_FM_WG_BM, BN = MOE_FM_WG_BN, BK = 64, NT = 256, STAGES = MOE_FM_WG_STAGES;
    extern __shared__ unsigned char moe__fm_wg_raw[];
    __nv_bfloat16 *As = (__nv_bfloat16 *)(((uintptr_t)moe__fm_wg_raw + 1023) & ~(uintptr_t)1023);
    __nv_bfloat16 *Bs = As + STAGES * BM * BK;
    __shared__ int rowsrc[BM], rowpair[BM];

    moe__fm_pdl_enter();
    int tile, nb;
    if (!moe__fm_map(*a.ntiles, (a.N + BN - 1) / BN, tile, nb)) return;
    const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, w4 = (tid >> 5) & 3;
    const int le = a.tile_e[tile], r0 = a.tile_r0[tile], nr = a.tile_n[tile];
    const int64_t e = (int64_t)a.lo + le;
    const int n0 = nb * BN;
    const int nvalid = min(BN, a.N - n0);
    for (int r = tid; r < BM; r += NT) {
        if (r < nr) {
            int p = a.sorted[r0 + r];
            rowpair[r] = p;
            rowsrc[r] = G1 ? p / a.K : r0 + r;
        } else {
            rowpair[r] = -1;
            rowsrc[r] = -1;
        }
    }
    __syncthreads();
    const __nv_bfloat16 *Wb = a.W + (e * a.N + n0) * (int64_t)a.Kd;
    const int KT = a.Kd / BK;

    auto load = [&](int stage, int kt) {
        const int k0 = kt * BK;
        __nv_bfloat16 *as = As + stage * BM * BK, *bs = Bs + stage * BN * BK;
#pragma unroll
        for (int i = 0; i < BM * 8 / NT; i++) {
            const int c = tid + i * NT, r = c >> 3, ch = c & 7, src = rowsrc[r];
            const __nv_bfloat16 *g = src >= 0 ? a.A + (int64_t)src * a.Kd + k0 + ch * 8 : a.A;
            moe__fm_cp16(moe__fm_smem(as + moe__fm_swz(r, ch)), g, src >= 0 ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < BN * 8 / NT; i++) {
            const int c = tid + i * NT, r = c >> 3, ch = c & 7;
            const bool ok = r < nvalid;
            moe__fm_cp16(moe__fm_smem(bs + moe__fm_swz(r, ch)), ok ? Wb + (int64_t)r * a.Kd + k0 + ch * 8 : a.W,
                         ok ? 16 : 0);
        }
    };

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load(s, s);
        moe__fm_commit();
    }
    /* per k tile: stage kt landed -> issue its 4 wgmma (async) -> wait until the previous
     * tile's wgmma are done in both warpgroups -> refill that tile's stage; so the tensor
     * cores work on tile kt while the barrier, the wait and the next loads go on. */
    for (int kt = 0; kt < KT; kt++) {
        moe__fm_wait<STAGES - 2>();
        moe__fm_fence_async();
        __syncthreads();
        const int st = kt % STAGES;
        const uint64_t da = moe__fm_desc(moe__fm_smem(As + st * BM * BK + wg * 64 * BK));
        const uint64_t db = moe__fm_desc(moe__fm_smem(Bs + st * BN * BK));
        moe__fm_wg_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) moe__fm_wgmma_n256(acc, da + 2 * ks, db + 2 * ks);
        moe__fm_wg_commit();
        moe__fm_wg_wait1();
        __syncthreads();
        const int nk = kt + STAGES - 1; /* its stage (kt - 1) % STAGES is free now */
        if (nk < KT) load(nk % STAGES, nk);
        moe__fm_commit();
    }
    moe__fm_wg_wait0();
    moe__fm_wait<0>();

    moe__fm_wg_epi<G1>(a, acc, wg, w4, lane, e, r0, nr, n0, nvalid, rowpair);
}

/* Hopper warp-specialised version of the large configuration (the default on sm_90a):
 * persistent (one CTA per SM walks the tiles in the grouped order of moe__fm_map), 384
 * threads = 1 producer warpgroup + 2 consumer warpgroups (64 x 256 of the 128 x 256 tile
 * each), 4 shared-memory stages on mbarriers.  The producer loads the weight tile (256 x 64)
 * with one bulk tensor copy (128-byte swizzle, completing on the stage's "full" barrier with
 * its byte count) and gathers the 128 A rows through the permutation with cp.async (16 bytes,
 * zero-filled past the tile's rows); it keeps two stages of cp.async in flight and marks a
 * stage full only after its own copies landed and it fenced them for the async proxy (the
 * same discipline as the kernel above).  The consumers run wgmma.m64n256k16 on a full stage,
 * keep one stage of wgmma in flight, release the previous stage to the producer ("empty"
 * barrier), and write the epilogue while the producer already fills the next tile's stages.
 * setmaxnreg moves registers from the producer (72) to the consumers (216).  Rows of W past
 * N (N not a multiple of 256) are whatever the copy reads there (the next expert's rows, or
 * zeros past the tensor): their columns are not written.
 * TA (MOE_FUSED_TMA_A, default): A rows are contiguous in sorted order (GEMM1: xp made by
 * k_permute; GEMM2: the intermediate), so one producer thread loads the A tile by bulk tensor
 * copy too (tensor map `tma` over A as [P, Kd], one 128-row box, SWIZZLE_128B: the layout of
 * moe__fm_swz / moe__fm_desc, like the weight tile) and announces both tiles' bytes with its
 * single arrival on the stage's full barrier (count 1): no cp.async, no wait_group, all S
 * stages are lookahead; the producer warpgroup keeps 40 registers.  Rows r0 + r, r >= nr, of
 * the box belong to the next expert, to stale rows past the valid count, or are zero-filled
 * past P (the byte count is the full box's either way): only rows r < nr are written. */
#define MOE_FM_WS_STAGES 4
#define MOE_FM_WS_LAG 2
#define MOE_FM_WS_SMEM (MOE_FM_WS_STAGES * (MOE_FM_WG_BM + MOE_FM_WG_BN) * 64 * 2 + 1024 + 2 * MOE_FM_WS_STAGES * 8)

template <bool G1, bool TA>
__global__ void __launch_bounds__(384, 1)
    moe__k_fm_gemm_ws(const moe__fm_gemm_args a, const __grid_constant__ CUtensorMap tmw,
                      const __grid_constant__ CUtensorMap tma) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BM = MOE_FM_WG_BM, BN = MOE_FM_WG_BN, BK = 64, S = MOE_FM_WS_STAGES, LAG = MOE_FM_WS_LAG;
    constexpr int HB = BN / 2; /* the weight tile is loaded as two 128-row boxes */
    extern __shared__ unsigned char moe__fm_ws_raw[];
    __nv_bfloat16 *As = (__nv_bfloat16 *)(((uintptr_t)moe__fm_ws_raw + 1023) & ~(uintptr_t)1023);
    __nv_bfloat16 *Bs = As + S * BM * BK;
    const uint32_t bar0 = moe__fm_smem(Bs + S * BN * BK); /* full[s] at bar0 + 8s, empty[s] at bar0 + 8(S + s) */
    const int tid = threadIdx.x;
    const int cs = a.cs; /* CTAs per cluster: 1, or 2 sharing (multicasting) the weight tile */
    const uint32_t rank = cs == 2 ? (blockIdx.x & 1) : 0;
    const int cid = blockIdx.x / cs, ncl = gridDim.x / cs;
    moe__fm_pdl_enter();
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            moe__fm_mbar_init(bar0 + 8 * s, TA ? 1 : 128 + 1); /* (128 producer arrivals +) the expect_tx one */
            moe__fm_mbar_init(bar0 + 8 * (S + s), 8 * cs); /* one per consumer warp of the cluster */
        }
        moe__fm_mbar_init_fence();
    }
    if (cs == 2) moe__fm_cluster_sync(); /* the peer multicasts into our stages and barriers */
    else __syncthreads();
    /* work items: groups of cs consecutive row tiles (CTA `rank` takes tile cs*pair + rank) x
     * column tiles, in the grouped order of moe__fm_map (8 row tiles per group) */
    const int ntiles = *a.ntiles, ntn = (a.N + BN - 1) / BN;
    const int npairs = (ntiles + cs - 1) / cs, GMp = 8 / cs;
    const int64_t total = (int64_t)npairs * ntn;
    const int KT = a.Kd / BK;
    auto item = [&](int64_t w, int &le, int &r0, int &nr, int &nb, bool &shared) {
        const int group = (int)(w / ((int64_t)GMp * ntn));
        const int in = (int)(w - (int64_t)group * GMp * ntn);
        const int gs = min(GMp, npairs - group * GMp);
        const int t0 = (group * GMp + in % gs) * cs, tile = t0 + (int)rank;
        nb = in / gs;
        const int le0 = a.tile_e[t0];
        shared = cs == 2 && t0 + 1 < ntiles && a.tile_e[t0 + 1] == le0;
        if (tile < ntiles) {
            le = a.tile_e[tile];
            r0 = a.tile_r0[tile];
            nr = a.tile_n[tile];
        } else { /* odd tile count: the second CTA runs an empty tile in step */
            le = le0;
            r0 = 0;
            nr = 0;
        }
    };

    if (TA && tid < 128) {
        /* ---------------- producer, A and W by bulk tensor copy ---------------- */
        moe__fm_setmaxnreg_dec<40>();
        if (tid == 0) {
            int it = 0;
            for (int64_t w = cid; w < total; w += ncl) {
                int le, r0, nr, nb;
                bool shared;
                item(w, le, r0, nr, nb, shared);
                const int wrow = (int)(((int64_t)a.lo + le) * a.N) + nb * BN;
                for (int kt = 0; kt < KT; kt++, it++) {
                    const int s = it % S;
                    const uint32_t full = bar0 + 8 * s, bs = moe__fm_smem(Bs + s * BN * BK);
                    moe__fm_mbar_wait_cl(bar0 + 8 * (S + s), ((it / S) & 1) ^ 1);
                    moe__fm_mbar_arrive_tx(full, (BN + BM) * BK * 2);
                    if (shared) {
                        moe__fm_tma2d_mc(bs + rank * HB * BK * 2, &tmw, kt * BK, wrow + (int)rank * HB, full,
                                         (uint16_t)3);
                    } else {
                        moe__fm_tma2d(bs, &tmw, kt * BK, wrow, full);
                        moe__fm_tma2d(bs + HB * BK * 2, &tmw, kt * BK, wrow + HB, full);
                    }
                    moe__fm_tma2d(moe__fm_smem(As + s * BM * BK), &tma, kt * BK, r0, full);
                }
            }
        }
        __syncwarp();
    } else if (tid < 128) {
        /* ---------------- producer, A gathered with cp.async ---------------- */
        moe__fm_setmaxnreg_dec<72>();
        const int ch = tid & 7, rb = tid >> 3; /* rows rb + 16i, 16-byte chunk ch */
        int it = 0;
        for (int64_t w = cid; w < total; w += ncl) {
            int le, r0, nr, nb;
            bool shared;
            item(w, le, r0, nr, nb, shared);
            const int wrow = (int)(((int64_t)a.lo + le) * a.N) + nb * BN;
            int src[BM / 16];
#pragma unroll
            for (int i = 0; i < BM / 16; i++) {
                const int r = rb + 16 * i;
                src[i] = r < nr ? (G1 ? a.sorted[r0 + r] / a.K : r0 + r) : -1;
            }
            for (int kt = 0; kt < KT; kt++, it++) {
                const int s = it % S;
                moe__fm_mbar_wait_cl(bar0 + 8 * (S + s), ((it / S) & 1) ^ 1);
                if (tid == 0) {
                    const uint32_t bs = moe__fm_smem(Bs + s * BN * BK);
                    moe__fm_mbar_arrive_tx(bar0 + 8 * s, BN * BK * 2);
                    if (shared) {
                        moe__fm_tma2d_mc(bs + rank * HB * BK * 2, &tmw, kt * BK, wrow + (int)rank * HB, bar0 + 8 * s,
                                         (uint16_t)3);
                    } else {
                        moe__fm_tma2d(bs, &tmw, kt * BK, wrow, bar0 + 8 * s);
                        moe__fm_tma2d(bs + HB * BK * 2, &tmw, kt * BK, wrow + HB, bar0 + 8 * s);
                    }
                }
                __nv_bfloat16 *as = As + s * BM * BK;
#pragma unroll
                for (int i = 0; i < BM / 16; i++) {
                    const int r = rb + 16 * i;
                    const __nv_bfloat16 *g = src[i] >= 0 ? a.A + (int64_t)src[i] * a.Kd + kt * BK + ch * 8 : a.A;
                    moe__fm_cp16(moe__fm_smem(as + moe__fm_swz(r, ch)), g, src[i] >= 0 ? 16 : 0);
                }
                moe__fm_commit();
                if (it >= LAG) {
                    moe__fm_wait<LAG>();
                    moe__fm_fence_async();
                    moe__fm_mbar_arrive(bar0 + 8 * ((it - LAG) % S));
                }
            }
        }
        moe__fm_wait<0>();
        moe__fm_fence_async();
        for (int j = it - LAG < 0 ? 0 : it - LAG; j < it; j++) moe__fm_mbar_arrive(bar0 + 8 * (j % S));
    } else {
        /* ---------------- consumers ---------------- */
        moe__fm_setmaxnreg_inc<216>();
        const int ct = tid - 128, lane = tid & 31, wg = ct >> 7, w4 = (ct >> 5) & 3;
        int it = 0;
        float acc[128];
        for (int64_t w = cid; w < total; w += ncl) {
            int le, r0, nr, nb;
            bool shared;
            item(w, le, r0, nr, nb, shared);
            const int n0 = nb * BN, nvalid = min(BN, a.N - n0);
#pragma unroll
            for (int i = 0; i < 128; i++) acc[i] = 0.0f;
            for (int kt = 0; kt < KT; kt++, it++) {
                const int s = it % S;
                moe__fm_mbar_wait_cl(bar0 + 8 * s, (it / S) & 1);
                const uint64_t da = moe__fm_desc(moe__fm_smem(As + s * BM * BK + wg * 64 * BK));
                const uint64_t db = moe__fm_desc(moe__fm_smem(Bs + s * BN * BK));
                moe__fm_wg_fence();
#pragma unroll
                for (int ks = 0; ks < BK / 16; ks++) moe__fm_wgmma_n256(acc, da + 2 * ks, db + 2 * ks);
                moe__fm_wg_commit();
                moe__fm_wg_wait1();
                if (kt > 0 && lane == 0) {
                    const uint32_t eb = bar0 + 8 * (S + (it - 1) % S);
                    moe__fm_mbar_arrive(eb);
                    if (cs == 2) moe__fm_mbar_arrive_remote(eb, rank ^ 1);
                }
            }
            moe__fm_wg_wait0();
            if (lane == 0) {
                const uint32_t eb = bar0 + 8 * (S + (it - 1) % S);
                moe__fm_mbar_arrive(eb);
                if (cs == 2) moe__fm_mbar_arrive_remote(eb, rank ^ 1);
            }
            moe__fm_wg_epi<G1>(a, acc, wg, w4, lane, (int64_t)a.lo + le, r0, nr, n0, nvalid, a.sorted + r0);
        }
    }
    if (cs == 2) moe__fm_cluster_sync(); /* no CTA leaves while its peer may still reach its memory */
#endif
}

/* -------------------------------------------------------------- finalize -- */

/* out[t, 8c .. 8c+7] = bf16(sum over local k in order of y[t*K + k, ...]). */
__global__ void moe__k_fm_finalize(const float *y, const int32_t *ids, int64_t T, int K, int H, int E, int lo, int lc,
                                   uint16_t *out) {
    moe__fm_pdl_enter();
    const int H8 = H >> 3;
    const int64_t units = T * H8;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = u / H8;
        const int c = (int)(u - t * H8) * 8;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < K; k++) {
            const int id = ids[t * K + k];
            if (id < 0 || id >= E || id - lo < 0 || id - lo >= lc) continue;
            const float4 *src = (const float4 *)(y + (t * K + k) * (int64_t)H + c);
            const float4 v0 = src[0], v1 = src[1];
            acc[0] += v0.x;
            acc[1] += v0.y;
            acc[2] += v0.z;
            acc[3] += v0.w;
            acc[4] += v1.x;
            acc[5] += v1.y;
            acc[6] += v1.z;
            acc[7] += v1.w;
        }
        uint4 o;
        o.x = (uint32_t)moe__f32_to_bf16(acc[0]) | ((uint32_t)moe__f32_to_bf16(acc[1]) << 16);
        o.y = (uint32_t)moe__f32_to_bf16(acc[2]) | ((uint32_t)moe__f32_to_bf16(acc[3]) << 16);
        o.z = (uint32_t)moe__f32_to_bf16(acc[4]) | ((uint32_t)moe__f32_to_bf16(acc[5]) << 16);
        o.w = (uint32_t)moe__f32_to_bf16(acc[6]) | ((uint32_t)moe__f32_to_bf16(acc[7]) << 16);
        *(uint4 *)(out + t * (int64_t)H + c) = o;
    }
}

/* ------------------------------------------------------------ host glue -- */

/* The two tile configurations (the only GEMM instantiations: 2 configs x 2 stages). */
#define MOE_FM_SMALL 32, 64, 1, 4, 6, 3
#define MOE_FM_LARGE 128, 128, 2, 4, 3, 2
typedef moe__fm_cfg<32, 64, 1, 4, 6> moe__fm_small;
typedef moe__fm_cfg<128, 128, 2, 4, 3> moe__fm_large;

static int moe__fm_have_wg = 0, moe__fm_have_pdl = 0;
static PFN_cuTensorMapEncodeTiled_v12000 moe__fm_encode = nullptr;
static int moe__fm_small_occ = 1; /* resident small-tile GEMM1 blocks per SM */
static int moe__fm_ws_ncl = 0;    /* resident 2-CTA clusters of the warp-specialised kernel (0: none) */

static moe_status moe__fm_attrs(void) {
    static int done = 0;
    if (__atomic_load_n(&done, __ATOMIC_ACQUIRE)) return MOE_OK;
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm<MOE_FM_SMALL, true>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, moe__fm_small::SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm<MOE_FM_SMALL, false>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, moe__fm_small::SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm<MOE_FM_LARGE, true>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, moe__fm_large::SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm<MOE_FM_LARGE, false>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, moe__fm_large::SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm_wg<true>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_FM_WG_SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm_wg<false>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_FM_WG_SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm_ws<true, true>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_FM_WS_SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm_ws<false, true>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_FM_WS_SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm_ws<true, false>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_FM_WS_SMEM));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncSetAttribute(moe__k_fm_gemm_ws<false, false>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_FM_WS_SMEM));
    /* the wgmma kernel has a body only in the sm_90a binary */
    cudaFuncAttributes fa;
    int dev = 0, major = 0;
    MOE_CUDA_TRY("moe_experts_new", cudaGetDevice(&dev));
    MOE_CUDA_TRY("moe_experts_new", cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    MOE_CUDA_TRY("moe_experts_new", cudaFuncGetAttributes(&fa, moe__k_fm_gemm_wg<true>));
    moe__fm_have_wg = major == 9 && fa.binaryVersion == 90;
    moe__fm_have_pdl = major >= 9;
    MOE_CUDA_TRY("moe_experts_new", cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                        &moe__fm_small_occ, moe__k_fm_gemm<MOE_FM_SMALL, true>,
                                        moe__fm_small::THREADS, moe__fm_small::SMEM));
    if (moe__fm_small_occ < 1) moe__fm_small_occ = 1;
    if (moe__fm_have_wg) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeClusterDimension;
        at[0].val.clusterDim.x = 2;
        at[0].val.clusterDim.y = 1;
        at[0].val.clusterDim.z = 1;
        cfg.gridDim = dim3(2 * 66);
        cfg.blockDim = dim3(384);
        cfg.dynamicSmemBytes = MOE_FM_WS_SMEM;
        cfg.attrs = at;
        cfg.numAttrs = 1;
        int ncl = 0;
        if (cudaOccupancyMaxActiveClusters(&ncl, moe__k_fm_gemm_ws<true, true>, &cfg) == cudaSuccess)
            moe__fm_ws_ncl = ncl;
        (void)cudaGetLastError();
    }
    if (moe__fm_have_wg) {
        /* the tensor-map encoder lives in the driver: fetched once, without linking libcuda */
        void *fp = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fp, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            moe__fm_encode = (PFN_cuTensorMapEncodeTiled_v12000)fp;
        (void)cudaGetLastError();
    }
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
    return MOE_OK;
}

/* Large-tile path: 2 = warp-specialised wgmma with bulk tensor copies (default on sm_90a with
 * the driver's tensor-map encoder), 1 = wgmma with cp.async only (MOE_FUSED_WGMMA=1),
 * 0 = mma.sync (MOE_FUSED_WGMMA=0, and every non-sm_90a build). */
static int moe__fm_wg_mode(void) {
    if (!moe__fm_have_wg) return 0;
    const char *env = getenv("MOE_FUSED_WGMMA");
    if (env && env[0] == '0') return 0;
    if (env && env[0] == '1') return 1;
    return moe__fm_encode ? 2 : 1;
}

/* Resident 2-CTA clusters when the warp-specialised kernel runs as clusters multicasting
 * the weight tile (MOE_FUSED_CLUSTER=1), else 0. */
static int moe__fm_ws_clusters(void) {
    const char *env = getenv("MOE_FUSED_CLUSTER");
    return env && env[0] == '1' ? moe__fm_ws_ncl : 0;
}

/* A operand of the warp-specialised kernel by bulk tensor copy from rows made contiguous by
 * k_permute (default), or gathered through the permutation with cp.async (MOE_FUSED_TMA_A=0). */
static bool moe__fm_tma_a(void) {
    const char *env = getenv("MOE_FUSED_TMA_A");
    return !(env && env[0] == '0');
}

/* Tensor map of a row-major [rows, cols] matrix of elem_bytes-byte elements (2: bf16 / f16,
 * 1: codes; `what`, for the error), boxes of box_cols x box_rows, with the swizzle of `swizzle`
 * bytes: 128 (box rows of 128 bytes: the layout moe__fm_swz / moe__fm_desc describe), 32 (box
 * rows of 32 bytes: the 16-byte halves of rows 4-7 of every 8 swapped) or 0 (none); elements past
 * the matrix read as zeros (OOB_FILL_NONE). */
moe_status moe__fm_tmap2(CUtensorMap *m, const void *base, int64_t rows, int64_t cols, int elem_bytes, int box_cols,
                         int box_rows, int swizzle, const char *what) {
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)cols * (cuuint64_t)elem_bytes};
    cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
    cuuint32_t es[2] = {1, 1};
    CUresult r = moe__fm_encode(m, elem_bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                                (void *)base, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                swizzle == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                : CU_TENSOR_MAP_SWIZZLE_NONE,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        return moe__err(MOE_ERR_CUDA, FN ": cuTensorMapEncodeTiled failed (CUresult %d) for the [%lld, %lld] %s", (int)r,
                        (long long)rows, (long long)cols, what);
    return MOE_OK;
}
/* bf16 [rows, cols], boxes of 64 columns x box_rows, 128-byte swizzle. */
static moe_status moe__fm_tmap(CUtensorMap *m, const void *base, int64_t rows, int64_t cols, int box_rows,
                               const char *what) {
    return moe__fm_tmap2(m, base, rows, cols, 2, 64, box_rows, 128, what);
}

moe_status moe__fm_hopper_ready(bool *ok) {
    *ok = false;
    MOE_TRY(moe__fm_attrs());
    *ok = moe__fm_have_wg && moe__fm_encode != nullptr;
    return MOE_OK;
}

extern "C" moe_status moe__cuda_fused_pack(struct moe_experts *ex, const moe_tensor *w13, const moe_tensor *w2,
                                           const moe_tensor *b13, const moe_tensor *b2) {
    const char *fn = "moe_experts_new";
    moe__cuda_guard g(fn, ex->dev.index);
    MOE_TRY(g.status);
    MOE_TRY(moe__fm_attrs());
    const int gated = ex->act != MOE_ACT_RELU2;
    int64_t s13[3] = {ex->E, ex->N1, ex->H}, s2[3] = {ex->E, ex->H, ex->I};
    int64_t sb13[2] = {ex->E, ex->N1}, sb2[2] = {ex->E, ex->H};
    MOE_TRY(moe_tensor_new(&ex->w13, MOE_BF16, 3, s13, ex->dev));
    MOE_TRY(moe_tensor_new(&ex->w2, MOE_BF16, 3, s2, ex->dev));
    const int threads = 256;
    moe__k_fm_pack<<<moe__cuda_grid(g.dev, ex->E * ex->N1 * ex->H, threads), threads, 0, g.stream>>>(
        moe_tensor_data(w13), w13->dtype == MOE_BF16, (uint16_t *)moe_tensor_data(ex->w13), ex->E, ex->N1, ex->H,
        gated, ex->I);
    MOE_CUDA_LAUNCHED(fn);
    moe__k_fm_pack<<<moe__cuda_grid(g.dev, ex->E * ex->H * ex->I, threads), threads, 0, g.stream>>>(
        moe_tensor_data(w2), w2->dtype == MOE_BF16, (uint16_t *)moe_tensor_data(ex->w2), ex->E, ex->H, ex->I, 0, 0);
    MOE_CUDA_LAUNCHED(fn);
    if (b13) {
        MOE_TRY(moe_tensor_new(&ex->b13, MOE_F32, 2, sb13, ex->dev));
        moe__k_fm_pack_bias<<<moe__cuda_grid(g.dev, ex->E * ex->N1, threads), threads, 0, g.stream>>>(
            moe_tensor_data(b13), b13->dtype == MOE_BF16, (float *)moe_tensor_data(ex->b13), ex->E, ex->N1, gated,
            ex->I);
        MOE_CUDA_LAUNCHED(fn);
    }
    if (b2) {
        MOE_TRY(moe_tensor_new(&ex->b2, MOE_F32, 2, sb2, ex->dev));
        moe__k_fm_pack_bias<<<moe__cuda_grid(g.dev, ex->E * ex->H, threads), threads, 0, g.stream>>>(
            moe_tensor_data(b2), b2->dtype == MOE_BF16, (float *)moe_tensor_data(ex->b2), ex->E, ex->H, 0, 0);
        MOE_CUDA_LAUNCHED(fn);
    }
    /* the sources may be temporaries freed by the caller right after: finish first */
    MOE_CUDA_TRY(fn, cudaStreamSynchronize(g.stream));
    return MOE_OK;
}

/* The warp-specialised kernel (tensor maps of W and, for the TA variant, of A), as `cs`-CTA
 * clusters when cs is 2. */
static moe_status moe__fm_go_ws(void (*k)(const moe__fm_gemm_args, const CUtensorMap, const CUtensorMap),
                                unsigned grid, int cs, cudaStream_t stream, bool pdl, const moe__fm_gemm_args &a,
                                const CUtensorMap &t, const CUtensorMap &ta) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(384);
    cfg.dynamicSmemBytes = MOE_FM_WS_SMEM;
    cfg.stream = stream;
    cudaLaunchAttribute at[2];
    int n = 0;
    if (pdl) {
        at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cs == 2) {
        at[n].id = cudaLaunchAttributeClusterDimension;
        at[n].val.clusterDim.x = 2;
        at[n].val.clusterDim.y = 1;
        at[n++].val.clusterDim.z = 1;
    }
    cfg.attrs = n ? at : nullptr;
    cfg.numAttrs = n;
    MOE_CUDA_TRY(FN, cudaLaunchKernelEx(&cfg, k, a, t, ta));
    return MOE_OK;
}

/* PDL in use: a 9.0+ device and MOE_FUSED_PDL=1.  Off by default: measured on an H100
 * (2026-11-26) it made decode slower (Qwen3-30B-A3B T=1: 56.0 us with, 48.3 us without;
 * Mixtral T=1: 378 vs 324 us) and changed nothing measurable at larger T. */
static bool moe__fm_use_pdl(void) {
    if (!moe__fm_have_pdl) return false;
    const char *env = getenv("MOE_FUSED_PDL");
    return env && env[0] == '1';
}

/* Decode folds (align into G1, finalize into G2; small tiles, P <= MOE_FM_FOLD_MAXP pairs):
 * 1 (default) while GEMM1's grid fits in one wave, 2 (MOE_FUSED_FOLD=2) whenever allowed,
 * 0 (MOE_FUSED_FOLD=0) never. */
static int moe__fm_fold_mode(void) {
    const char *env = getenv("MOE_FUSED_FOLD");
    if (env && env[0] == '0') return 0;
    if (env && env[0] == '2') return 2;
    return 1;
}

template <int BM, int BN, int WM, int WN, int STAGES, int MINB>
static moe_status moe__fm_launch(const moe__cuda_guard &g, const moe__fm_gemm_args &a1, const moe__fm_gemm_args &a2,
                                 int64_t P, int lc) {
    typedef moe__fm_cfg<BM, BN, WM, WN, STAGES> C;
    const int64_t tiles = P / BM + (P < lc ? P : lc) + 1;
    dim3 g1((unsigned)(tiles * (a1.N / BN))), g2((unsigned)(tiles * (a2.N / BN)));
    const bool pdl = moe__fm_use_pdl();
    MOE_TRY(moe__fm_go(moe__k_fm_gemm<BM, BN, WM, WN, STAGES, MINB, true>, g1, C::THREADS, C::SMEM, g.stream, pdl, a1));
    MOE_TRY(moe__fm_go(moe__k_fm_gemm<BM, BN, WM, WN, STAGES, MINB, false>, g2, C::THREADS, C::SMEM, g.stream, pdl, a2));
    return MOE_OK;
}

extern "C" moe_status moe__cuda_fused(const moe__fused_args *A) {
    const struct moe_experts *ex = A->ex;
    struct moe_workspace *ws = A->ws;
    moe__cuda_guard g(FN, ex->dev.index);
    MOE_TRY(g.status);
    MOE_TRY(moe__fm_attrs());
    const int64_t T = A->T, P = T * A->K;
    const int lc = A->local_count, lo = A->local_offset;
    unsigned char *base = (unsigned char *)moe_tensor_data(ws->buf);
    int32_t *sorted = (int32_t *)(base + ws->off_sorted);
    int32_t *tile_e = (int32_t *)(base + ws->off_tiles);
    int32_t *tile_r0 = tile_e + ws->max_tiles;
    int32_t *tile_n = tile_r0 + ws->max_tiles;
    int32_t *ntiles = (int32_t *)(base + ws->off_ntiles);
    int32_t *err = (int32_t *)(base + ws->off_err);
    __nv_bfloat16 *inter = (__nv_bfloat16 *)(base + ws->off_inter);
    float *y = (float *)(base + ws->off_y);
    const int32_t *ids = (const int32_t *)moe_tensor_data(A->ids);
    const float *wts = (const float *)moe_tensor_data(A->wts);

    const bool large = lc > 0 && P >= (int64_t)48 * lc;
    const int BM = large ? 128 : 32; /* row tile of MOE_FM_LARGE / MOE_FM_SMALL */
    size_t sm = (size_t)(lc > 0 ? 2 * lc : 1) * sizeof(int);
    const bool pdl = moe__fm_use_pdl();
    if (moe__fm_gemv_eligible(A)) {
        if (lc > 0) moe__fused_path_hit(MOE_FUSED_PATH_GEMV);
        return moe__fm_gemv(g, A, pdl); /* decode GEMV path: fused_gemv.cu */
    }
    /* the folds only while GEMM1's grid fits in one wave: each block's align prologue
     * costs ~1.5 us, paid once per wave (measured on an H100, Qwen3-30B-A3B: T=1 46.2 ->
     * 43.8 us with the folds, but T=16 294 -> 302 and T=64 445 -> 465 us in 5-8 waves) */
    const int64_t g1_blocks = (P / 32 + (P < lc ? P : lc) + 1) * (ex->N1 / 64);
    const int fmode = moe__fm_fold_mode();
    const bool fold = lc > 0 && !large && P <= MOE_FM_FOLD_MAXP && lc <= MOE_FM_FOLD_MAXE && fmode > 0 &&
                      (fmode == 2 || g1_blocks <= (int64_t)moe__cuda_sm_count(g.dev) * moe__fm_small_occ);
    if (!fold)
        MOE_TRY(moe__fm_go(moe__k_fm_align, dim3(1), MOE_FM_ALIGN_THREADS, sm, g.stream, pdl, ids, P, (int)ex->E, lo, lc,
                           BM, sorted, tile_e, tile_r0, tile_n, ntiles, err, (int32_t *)nullptr, (const uint4 *)nullptr, (int64_t)0, (unsigned int *)nullptr));

    moe__fm_gemm_args a1, a2;
    memset(&a1, 0, sizeof a1);
    a1.A = (const __nv_bfloat16 *)moe_tensor_data(A->hidden);
    a1.W = (const __nv_bfloat16 *)moe_tensor_data(ex->w13);
    a1.bias = ex->b13 ? (const float *)moe_tensor_data(ex->b13) : nullptr;
    a1.sorted = sorted;
    a1.tile_e = tile_e;
    a1.tile_r0 = tile_r0;
    a1.tile_n = tile_n;
    a1.ntiles = ntiles;
    a1.wts = wts;
    a1.N = (int)ex->N1;
    a1.Kd = (int)ex->H;
    a1.K = A->K;
    a1.lo = lo;
    a1.act = ex->act;
    a1.llama4 = A->llama4;
    a1.I = (int)ex->I;
    a1.alpha = ex->alpha;
    a1.beta = ex->beta;
    a1.limit = ex->limit;
    a1.inter = inter;
    a1.fold = fold;
    a1.E = (int)ex->E;
    a1.lc = lc;
    a1.P = P;
    a1.T = T;
    a1.ids = ids;
    a1.sorted_w = sorted;
    a1.tile_e_w = tile_e;
    a1.tile_r0_w = tile_r0;
    a1.tile_n_w = tile_n;
    a1.ntiles_w = ntiles;
    a1.err = err;
    a1.cnt = (int32_t *)(base + ws->off_cnt);
    a1.out = (uint16_t *)moe_tensor_data(A->out);
    a2 = a1;
    a2.A = inter;
    a2.W = (const __nv_bfloat16 *)moe_tensor_data(ex->w2);
    a2.bias = ex->b2 ? (const float *)moe_tensor_data(ex->b2) : nullptr;
    a2.N = (int)ex->H;
    a2.Kd = (int)ex->I;
    a2.y = y;
    const int wgm = lc > 0 && large ? moe__fm_wg_mode() : 0;
    if (lc > 0) moe__fused_path_hit(wgm ? MOE_FUSED_PATH_WGMMA : MOE_FUSED_PATH_TILE);
    if (wgm == 2) {
        CUtensorMap t1, t2;
        MOE_TRY(moe__fm_tmap(&t1, a1.W, ex->E * ex->N1, ex->H, MOE_FM_WG_BN / 2, "gate/up weight"));
        MOE_TRY(moe__fm_tmap(&t2, a2.W, ex->E * ex->H, ex->I, MOE_FM_WG_BN / 2, "down weight"));
        const int cs = moe__fm_ws_clusters() > 0 ? 2 : 1;
        a1.cs = a2.cs = cs;
        const int64_t tiles = P / MOE_FM_WG_BM + (P < lc ? P : lc) + 1, pairs = (tiles + cs - 1) / cs;
        const int64_t slots = cs == 2 ? moe__fm_ws_clusters() : moe__cuda_sm_count(g.dev); /* resident clusters */
        const int64_t n1 = pairs * ((a1.N + MOE_FM_WG_BN - 1) / MOE_FM_WG_BN);
        const int64_t n2 = pairs * ((a2.N + MOE_FM_WG_BN - 1) / MOE_FM_WG_BN);
        const unsigned g1 = (unsigned)((n1 < slots ? n1 : slots) * cs), g2 = (unsigned)((n2 < slots ? n2 : slots) * cs);
        if (moe__fm_tma_a()) {
            /* GEMM1's A rows, permuted into sorted order, go to the y region (f32 [P, H]:
             * twice the P*H*2 bytes needed).  The alias is safe on the one stream: y is written
             * only by GEMM2's epilogue and read only by k_finalize, and every kernel here
             * starts with griddepcontrol.wait (moe__fm_pdl_enter) before touching memory, which
             * returns only once its predecessor has completed and flushed (without PDL, plain
             * stream order); so GEMM2 writes y only after GEMM1 has read all of xp, and
             * k_permute overwrites it only after the previous call's k_finalize has read y. */
            __nv_bfloat16 *xp = (__nv_bfloat16 *)y;
            const int64_t pcap = (int64_t)moe__cuda_sm_count(g.dev) * 16, pb = P < pcap ? P : pcap; /* a row a block */
            MOE_TRY(moe__fm_go(moe__k_fm_permute, dim3((unsigned)pb), 256, 0, g.stream, pdl, (const uint4 *)a1.A,
                               (const int32_t *)sorted, (const int32_t *)tile_r0, (const int32_t *)tile_n,
                               (const int32_t *)ntiles, (int)A->K, (int)(ex->H / 8), (uint4 *)xp));
            CUtensorMap x1, x2;
            MOE_TRY(moe__fm_tmap(&x1, xp, P, ex->H, MOE_FM_WG_BM, "permuted hidden"));
            MOE_TRY(moe__fm_tmap(&x2, inter, P, ex->I, MOE_FM_WG_BM, "intermediate"));
            MOE_TRY(moe__fm_go_ws(moe__k_fm_gemm_ws<true, true>, g1, cs, g.stream, pdl, a1, t1, x1));
            MOE_TRY(moe__fm_go_ws(moe__k_fm_gemm_ws<false, true>, g2, cs, g.stream, pdl, a2, t2, x2));
        } else {
            MOE_TRY(moe__fm_go_ws(moe__k_fm_gemm_ws<true, false>, g1, cs, g.stream, pdl, a1, t1, t1));
            MOE_TRY(moe__fm_go_ws(moe__k_fm_gemm_ws<false, false>, g2, cs, g.stream, pdl, a2, t2, t2));
        }
    } else if (wgm == 1) {
        const int64_t tiles = P / MOE_FM_WG_BM + (P < lc ? P : lc) + 1;
        dim3 g1((unsigned)(tiles * ((a1.N + MOE_FM_WG_BN - 1) / MOE_FM_WG_BN)));
        dim3 g2((unsigned)(tiles * ((a2.N + MOE_FM_WG_BN - 1) / MOE_FM_WG_BN)));
        MOE_TRY(moe__fm_go(moe__k_fm_gemm_wg<true>, g1, 256, MOE_FM_WG_SMEM, g.stream, pdl, a1));
        MOE_TRY(moe__fm_go(moe__k_fm_gemm_wg<false>, g2, 256, MOE_FM_WG_SMEM, g.stream, pdl, a2));
    } else if (lc > 0) {
        if (large) MOE_TRY((moe__fm_launch<MOE_FM_LARGE>(g, a1, a2, P, lc)));
        else MOE_TRY((moe__fm_launch<MOE_FM_SMALL>(g, a1, a2, P, lc)));
    }
    if (fold) return MOE_OK; /* G2 wrote out */
    const int threads = 256;
    MOE_TRY(moe__fm_go(moe__k_fm_finalize, dim3(moe__cuda_grid(g.dev, T * (ex->H / 8), threads)), threads, 0, g.stream,
                       pdl, (const float *)y, ids, T, (int)A->K, (int)ex->H, (int)ex->E, lo, lc,
                       (uint16_t *)moe_tensor_data(A->out)));
    return MOE_OK;
}
